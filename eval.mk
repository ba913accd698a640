# eval.mk: evaluation targets, included by the Makefile (`include eval.mk`, after VENV and STAMP are set,
# so that eval-gsm8k depends on the install stamp).
#
#   make eval-gsm8k      generate GSM8K answers, then score them: prints accuracy ± standard error
#   make tiny-llada      build a tiny random LLaDA-format model in runs/tiny-llada (offline smoke runs)
#
# eval-gsm8k runs two commands:
#   difflm generate --recipe recipes/generate-gsm8k.yaml -m $(MODEL) --decode $(DECODE) --steps $(STEPS) \
#       --gen-length $(GEN_LENGTH) --kernel-size $(KERNEL) --top-k $(TOP_K) [--limit $(LIMIT)] \
#       [--data-path $(DATA_PATH)] --prompt-format $(PROMPT_FORMAT) -o $(OUT) $(GEN_ARGS)
#   difflm eval gsm8k --outputs $(OUT)
# The defaults are the paper's GSM8K setting on LLaDA-8B-Instruct (Seo et al. 2025): conv decoding,
# gen_length 512, 64 steps, kernel 128, top-k 1, chat prompt (paper: 39.34% vs 29.49% for LLaDA decoding).
# If $(OUT) already exists it is only scored (delete it to regenerate); an interrupted generation resumes
# when rerun with the same settings. The prompt format and every decode setting land in OUT.manifest.json.
#
# Variables (make eval-gsm8k VAR=value ...):
#   MODEL          model folder or Hub name                     (GSAI-ML/LLaDA-8B-Instruct)
#   DECODE         decoding method: conv, llada, topk, ...      (conv)
#   STEPS          denoising steps                              (64)
#   GEN_LENGTH     tokens generated per answer                  (512)
#   KERNEL         conv window K (even K becomes K+1)           (128)
#   TOP_K          keep the k best tokens                       (1)
#   LIMIT          only the first N problems                    (all 1319)
#   DATA_PATH      local copy of the GSM8K test set (hub schema: question, answer); needed offline,
#                  e.g. DATA_PATH=tests/fixtures/gsm8k.jsonl    (openai/gsm8k from the Hub)
#   PROMPT_FORMAT  chat | alpaca | alpaca-cot | raw             (chat)
#   BATCH_SIZE     prompts per batch                            (the recipe's: 16)
#   GEN_ARGS       more `difflm generate` options, e.g. GEN_ARGS="--block-length 32 --dtype float32"
#   OUT            outputs file                                 (runs/gsm8k/<model>-<decode>-L..-S..-K..-k..[-n..].json)
#
# Offline smoke run on a tiny random model (accuracy ~0; checks the whole path in seconds):
#   make tiny-llada && make eval-gsm8k MODEL=runs/tiny-llada LIMIT=20 DATA_PATH=tests/fixtures/gsm8k.jsonl

VENV ?= .venv
DIFFLM ?= $(VENV)/bin/difflm
EVAL_PY ?= $(VENV)/bin/python

MODEL ?= GSAI-ML/LLaDA-8B-Instruct
DECODE ?= conv
STEPS ?= 64
GEN_LENGTH ?= 512
KERNEL ?= 128
TOP_K ?= 1
LIMIT ?=
DATA_PATH ?=
PROMPT_FORMAT ?= chat
BATCH_SIZE ?=
GEN_ARGS ?=
OUT ?= runs/gsm8k/$(notdir $(patsubst %/,%,$(MODEL)))-$(DECODE)-L$(GEN_LENGTH)-S$(STEPS)-K$(KERNEL)-k$(TOP_K)$(if $(LIMIT),-n$(LIMIT)).json
TINY_MODEL ?= runs/tiny-llada

.PHONY: eval-gsm8k tiny-llada

eval-gsm8k: $(STAMP)
	@if [ -f "$(OUT)" ]; then echo "$(OUT) exists: scoring it (delete it to regenerate)"; else \
	  set -x; $(DIFFLM) generate --recipe recipes/generate-gsm8k.yaml -m "$(MODEL)" --decode $(DECODE) \
	    --steps $(STEPS) --gen-length $(GEN_LENGTH) --kernel-size $(KERNEL) --top-k $(TOP_K) \
	    --prompt-format $(PROMPT_FORMAT) $(if $(LIMIT),--limit $(LIMIT)) $(if $(DATA_PATH),--data-path "$(DATA_PATH)") \
	    $(if $(BATCH_SIZE),--batch-size $(BATCH_SIZE)) -o "$(OUT)" $(GEN_ARGS); fi
	$(DIFFLM) eval gsm8k --outputs "$(OUT)"

# a tiny random model in LLaDA's own format with a 1024-token context (fits the paper's gen_length 512)
tiny-llada: $(STAMP) $(TINY_MODEL)/config.json

$(TINY_MODEL)/config.json:
	$(EVAL_PY) -c "from difflm.testing import build_tiny_llada_checkpoint as b; b('$(TINY_MODEL)', max_sequence_length=1024)"
