"""Any OpenAI-compatible judge (vLLM, SGLang, llama.cpp's server, a hosted API) for alpaca_eval's annotators.

    difflm eval alpaca --outputs OUT.json --reference REF.json \\
        --judge-base-url http://127.0.0.1:8000/v1 --judge-model Qwen/Qwen2.5-72B-Instruct

Only the endpoint and the model name change: the annotator's prompt template, its completion parser and its
decoding settings (e.g. ``weighted_alpaca_eval_gpt4_turbo``: one token, ``logprobs: true``,
``top_logprobs: 5``) stay those of the chosen alpaca_eval annotator. How, with alpaca_eval's own mechanisms:

- the endpoint: alpaca_eval's OpenAI backend builds its clients from a *client config* file
  (``client_config_path``, the file ``OPENAI_CLIENT_CONFIG_PATH`` names; see alpaca_eval's
  ``client_configs/README.md``), whose entries may name a ``client_class``. difflm writes one such file
  (``OUT.json.alpaca_eval/judge_client.yaml``) naming `openai_client` below with the base URL, the *name*
  of the environment variable holding the key, the timeout and the retries, and hands its path to the
  annotator as a decoding argument. The key itself is read from the environment when the client is made:
  it is never written to disk nor passed through alpaca_eval's logged arguments.
- the model: a copy of the annotator's ``configs.yaml`` with ``completions_kwargs.model_name`` replaced
  (and the prompt template's path made absolute) in ``OUT.json.alpaca_eval/annotator/``. Its annotator name
  becomes ``<annotator>@<model>``, so the annotation cache never mixes two judges.

The key (``--judge-api-key-env VAR``, default ``OPENAI_API_KEY``) is not required for a loopback URL
(``localhost``, ``127.0.0.0/8``, ``::1``): a local server usually ignores it.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from difflm.errors import ConfigError

__all__ = ["DEFAULT_KEY_ENV", "JudgeEndpoint", "JudgeRecipe", "check_base_url", "is_loopback", "openai_client"]

DEFAULT_KEY_ENV = "OPENAI_API_KEY"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_base_url(url: str) -> str:
    """The URL, checked: http(s) with a host. ConfigError (key judge_base_url) otherwise."""
    try:
        parts = urlsplit(str(url))
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise ConfigError(f"{url!r} is not a URL ({e}); e.g. http://127.0.0.1:8000/v1", key="judge_base_url") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ConfigError(f"{url!r} is not an http(s) URL with a host; e.g. http://127.0.0.1:8000/v1",
                          key="judge_base_url")
    return str(url)


def is_loopback(url: str) -> bool:
    """Whether the URL's host is this machine (localhost, 127.0.0.0/8, ::1)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def openai_client(api_key_env: str | None = None, **kwargs: Any):
    """An `openai.OpenAI` client whose key is read from the environment variable `api_key_env` now (the
    ``client_class`` of the client config difflm writes; alpaca_eval calls it with the file's entries).
    A missing key becomes a placeholder: only a loopback judge gets here without one (checked before)."""
    import openai

    key = os.environ.get(api_key_env) if api_key_env else None
    return openai.OpenAI(api_key=key or "no-key-needed", **kwargs)


@dataclass(frozen=True)
class JudgeEndpoint:
    """Where the judge is: `base_url` None = the annotator's own (the OpenAI API); `model` None = the
    annotator's own model."""

    base_url: str | None = None
    model: str | None = None
    api_key_env: str = DEFAULT_KEY_ENV
    timeout: float = 120.0
    max_retries: int = 2

    @property
    def custom(self) -> bool:
        """Whether anything differs from the annotator's own settings."""
        return bool(self.base_url or self.model or self.api_key_env != DEFAULT_KEY_ENV)

    @property
    def where(self) -> str:
        return self.base_url or "the OpenAI API"

    def check(self, backends: set[str], annotator: str, environ: Mapping[str, str] | None = None) -> None:
        """ConfigError (one line) for a bad URL, model, timeout or key variable, an annotator that does not call
        an OpenAI-compatible API, or a missing key (not needed for a loopback URL)."""
        env = os.environ if environ is None else environ
        if self.base_url is not None:
            check_base_url(self.base_url)
        if self.model is not None and not str(self.model).strip():
            raise ConfigError("empty judge model name", key="judge_model")
        if not _ENV_NAME.match(self.api_key_env or ""):
            raise ConfigError(f"{self.api_key_env!r} is not an environment variable name", key="judge_api_key_env")
        if not self.timeout > 0:
            raise ConfigError(f"must be > 0 seconds, got {self.timeout!r}", key="judge_timeout")
        if backends != {"openai_completions"}:
            raise ConfigError(
                f"the annotator {annotator} calls {', '.join(sorted(backends))}; --judge-base-url/--judge-model work "
                "with annotators on alpaca_eval's openai_completions backend (e.g. weighted_alpaca_eval_gpt4_turbo)",
                key="annotator",
            )
        if not env.get(self.api_key_env) and not (self.base_url and is_loopback(self.base_url)):
            raise ConfigError(
                f"the judge at {self.where} needs an API key: set {self.api_key_env} (or name another variable "
                "with --judge-api-key-env)", key="judge_api_key_env")

    def write_client_config(self, path: Path) -> Path:
        """alpaca_eval's client config file for this endpoint (no secret in it: the key's variable name)."""
        import yaml

        entry: dict[str, Any] = {"client_class": f"{__name__}.openai_client", "api_key_env": self.api_key_env,
                                 "timeout": float(self.timeout), "max_retries": int(self.max_retries)}
        if self.base_url:
            entry["base_url"] = self.base_url
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({"default": [entry]}, sort_keys=False), encoding="utf-8")
        return path.resolve()

    def annotator_config(self, config_path: Path, out_dir: Path) -> tuple[Path, str | None]:
        """(the annotator config to use, its annotator name or None when unchanged). With a judge model, a copy
        of `config_path` whose ``completions_kwargs.model_name`` is the model, named ``<annotator>@<model>``."""
        if not self.model:
            return config_path, None
        import yaml

        cfg = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
        if not isinstance(cfg, dict) or len(cfg) != 1:
            raise ConfigError(f"{config_path}: --judge-model needs an annotator config with one annotator",
                              key="judge_model")
        (name, sub), = cfg.items()
        sub = dict(sub)
        sub["completions_kwargs"] = dict(sub.get("completions_kwargs") or {}, model_name=str(self.model))
        template = sub.get("prompt_template")
        if isinstance(template, str) and not Path(template).is_absolute():
            # alpaca_eval reads it relative to the config folder's parent: keep pointing at the original
            sub["prompt_template"] = str((config_path.parent.parent / template).resolve())
        new_name = f"{name}@{self.model}"
        # absolute: alpaca_eval reads a relative annotator path inside its own evaluators_configs/ folder
        folder = (out_dir / "annotator" / re.sub(r"[^A-Za-z0-9._-]+", "_", new_name)).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "configs.yaml"
        path.write_text(yaml.safe_dump({new_name: sub}, sort_keys=False), encoding="utf-8")
        return path, new_name


@dataclass
class JudgeRecipe:
    """The judging settings a recipe file can hold (``difflm eval alpaca --recipe judge.yaml``); the command's
    options win over the file."""

    annotator: str = field(default="weighted_alpaca_eval_gpt4_turbo",
                           metadata={"help": "alpaca_eval annotator (name, folder or configs.yaml)"})
    judge_base_url: str | None = field(default=None, metadata={"help": "OpenAI-compatible endpoint, e.g. "
                                                                       "http://127.0.0.1:8000/v1"})
    judge_model: str | None = field(default=None, metadata={"help": "the judge's model name at that endpoint"})
    judge_api_key_env: str = field(default=DEFAULT_KEY_ENV, metadata={"help": "environment variable with the key"})
    judge_timeout: float = field(default=120.0, metadata={"help": "seconds per judge request"})
    chunk_size: int = field(default=16, metadata={"min": 1, "help": "pairs judged between cache writes"})
    max_instances: int | None = field(default=None, metadata={"min": 1, "help": "judge only N pairs"})

    def endpoint(self) -> JudgeEndpoint:
        return JudgeEndpoint(base_url=self.judge_base_url, model=self.judge_model, api_key_env=self.judge_api_key_env,
                             timeout=self.judge_timeout)
