# paper.mk: one target per table of Seo et al. 2025 (arXiv 2509.15188), included by the Makefile.
#
#   make paper-table-N          N = 1..10: generation -> judging -> report for table N; prints first what it
#                               needs (GPU, hours, judge key, models to train), then runs
#                               python bench/paper_tables.py --table N ...  and writes runs/paper/table-N/RESULTS.md
#   make paper-tables           all ten, one after the other
#   make paper-smoke            every table on the CPU: embedded tiny models, LIMIT=2, a loopback test judge
#
# Variables (make paper-table-3 VAR=value ...); the rows, models and settings are in recipes/paper/table-N.yaml:
#   MODEL    ROLE=NAME[+ADAPTER],... for the table's roles (sft, r2ft, instruct, ...) or NAME[+ADAPTER] for all
#   LIMIT    the first N items of every eval set (the AR references too)
#   JUDGE    URL of an OpenAI-compatible judge server (difflm eval alpaca --judge-base-url), an alpaca_eval
#            annotator name, or `local` (the CPU test judge); default: GPT-4-turbo (OPENAI_API_KEY)
#   JUDGE_MODEL  the model name at the JUDGE URL (default gpt-4-turbo)
#   JUDGE_KEY_ENV  the environment variable holding the JUDGE URL's key (default OPENAI_API_KEY; loopback: none)
#   TINY=1   the CPU smoke run of the table (embedded models, tests/fixtures data)
#   DRY=1    print the needs and the commands, run nothing
#   PAPER_ARGS  more bench/paper_tables.py options (--rows ID,..., --eval-sets a,b, --out DIR)
# MODEL and LIMIT are read only when given on the command line or in the environment (eval.mk sets defaults
# of its own for eval-gsm8k).
#
# Examples:
#   make paper-table-4 DRY=1
#   make paper-table-3 MODEL="sft=GSAI-ML/LLaDA-8B-Base+runs/alpaca-lora/final" LIMIT=100
#   make paper-table-1 JUDGE=http://localhost:8000/v1 JUDGE_MODEL=Qwen2.5-72B-Instruct
#   make paper-table-3 JUDGE=https://api.example.com/v1 JUDGE_MODEL=gpt-4o JUDGE_KEY_ENV=EXAMPLE_API_KEY
#   make paper-table-9 TINY=1 LIMIT=2 JUDGE=local
PAPER_TABLES := 1 2 3 4 5 6 7 8 9 10
_given = $(filter command line environment,$(origin $(1)))
PAPER_CMD = $(PY) bench/paper_tables.py \
	$(if $(call _given,MODEL),--model "$(MODEL)") $(if $(call _given,LIMIT),$(if $(LIMIT),--limit $(LIMIT))) \
	$(if $(JUDGE),--judge "$(JUDGE)") $(if $(JUDGE_MODEL),--judge-model "$(JUDGE_MODEL)") \
	$(if $(JUDGE_KEY_ENV),--judge-key-env "$(JUDGE_KEY_ENV)") \
	$(if $(TINY),--tiny) $(if $(DRY),--dry-run) $(PAPER_ARGS)

.PHONY: $(addprefix paper-table-,$(PAPER_TABLES)) paper-tables paper-smoke

$(addprefix paper-table-,$(PAPER_TABLES)): paper-table-%: $(STAMP)
	$(PAPER_CMD) --table $*

paper-tables: $(STAMP)
	$(PAPER_CMD) --table all

paper-smoke: $(STAMP)
	$(PY) bench/paper_tables.py --table all --tiny --limit 2 --judge local $(PAPER_ARGS)
