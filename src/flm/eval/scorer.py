"""A small model-agnostic scoring interface, with implementations over our checkpoints and local HF models.

Every evaluation in `flm.eval` (the IQ suite and the lm-evaluation-harness adapter) talks to a model only through
`LanguageModel`, so the same numbers come out whichever front end asks, and any model that can score a
continuation and decode greedily can be evaluated.

Conventions shared by both implementations (`TokenScorer`):
- context and continuation are tokenised separately and concatenated, so the continuation's tokens are exactly
  `encode(continuation)`; an empty context is replaced by the end-of-text token, which every sequence can follow;
- log-probabilities are normalised over the tokenizer's real vocabulary (embedding rows padded past it are masked,
  as generation never emits them either);
- a sequence longer than the model's context is cut from the left, counted in `truncated`, and logged once.
"""

from __future__ import annotations

import copy
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from flm.device import resolve_device
from flm.errors import FlmError, require_module

log = logging.getLogger("flm.eval")


class LanguageModel(Protocol):
    """What an evaluation needs from a model.

    A model that cuts over-long prompts may count them in an int attribute `truncated`; the IQ report shows it.
    """

    name: str

    def loglikelihood(self, context: str, continuation: str) -> float:
        """Sum of the log-probabilities of the continuation's tokens given the context."""
        ...

    def greedy(self, context: str, max_new_tokens: int, stop: Sequence[str] = ("\n",)) -> str:
        """Greedy continuation of `context`, cut before the first stop string (and at end-of-text)."""
        ...


class TokenScorer(ABC):
    """The token-level machinery both backends share; a backend supplies tokenisation and forward passes.

    Subclasses set `name`, `max_length` (context size), `eot_id`, `vocab_limit` (ids >= it are never real tokens)
    and implement `encode`, `decode`, `_extend(ids, state) -> (logits [len(ids), V], state)` (read more tokens
    after those in `state`, a KV cache; None starts afresh) and `_branch(state, length)` (a state holding the
    first `length` tokens of `state` that can be extended without spoiling `state` for the next branch).

    Scoring several continuations of one context (the choices of a closed-set item, or lm-eval's requests for
    one document) reads the context once: its state is kept and branched for each continuation.
    """

    name: str
    max_length: int
    eot_id: int
    vocab_limit: int

    def __init__(self) -> None:
        self.truncated = 0  # sequences cut from the left to fit the context
        self._memo: tuple[list[int], torch.Tensor, Any] | None = None  # (context ids, last logits, state)

    # -- backend hooks --------------------------------------------------------------------------------------
    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def _extend(self, ids: list[int], state: Any) -> tuple[torch.Tensor, Any]: ...

    @abstractmethod
    def _branch(self, state: Any, length: int) -> Any: ...

    # -- shared logic ---------------------------------------------------------------------------------------
    def _fit(self, ids: list[int], limit: int) -> list[int]:
        """Keep the last `limit` ids, counting (and once logging) the cut."""
        if len(ids) <= limit:
            return ids
        if self.truncated == 0:
            log.warning("%s: an input of %d tokens was cut from the left to fit the model's %d-token context "
                        "(later cuts are only counted)", self.name, len(ids), self.max_length)
        self.truncated += 1
        return ids[-limit:]

    def _masked(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.vocab_limit < logits.size(-1):
            logits[..., self.vocab_limit:] = float("-inf")
        return logits

    @staticmethod
    def _logprob(logits: torch.Tensor, targets: list[int]) -> tuple[float, bool]:
        """Sum of log-softmax at the targets (logits [len(targets), V]), and whether argmax hits every target."""
        target = torch.tensor(targets, device=logits.device)
        total = F.log_softmax(logits, dim=-1).gather(-1, target[:, None]).sum().item()
        return total, bool((logits.argmax(dim=-1) == target).all())

    @torch.no_grad()
    def _context(self, ids: list[int]) -> tuple[torch.Tensor, Any]:
        """Logits after the last context token and a state to extend, reading the context only when it changed."""
        if self._memo is None or self._memo[0] != ids:
            logits, state = self._extend(ids, None)
            self._memo = (ids, logits[-1], state)
        return self._memo[1], self._branch(self._memo[2], len(ids))

    @torch.no_grad()
    def score(self, context: str, continuation: str) -> tuple[float, bool]:
        """(sum of continuation log-probs, whether greedy decoding would produce the continuation)."""
        cont = self.encode(continuation)
        if not cont:
            raise FlmError("cannot score an empty continuation")
        if len(cont) > self.max_length:
            raise FlmError(f"continuation of {len(cont)} tokens is longer than the model's context ({self.max_length})")
        ids = self._fit((self.encode(context) or [self.eot_id]) + cont, self.max_length + 1)
        last, state = self._context(ids[:-len(cont)])
        logits = last[None]
        if len(cont) > 1:
            logits = torch.cat([logits, self._extend(cont[:-1], state)[0]])
        return self._logprob(self._masked(logits), cont)

    def loglikelihood(self, context: str, continuation: str) -> float:
        return self.score(context, continuation)[0]

    @torch.no_grad()
    def rolling_loglikelihood(self, text: str) -> float:
        """Log-probability of the whole text after end-of-text, every token predicted once with the most context.

        Windows of max_length predictions; each later window re-reads up to max_length earlier tokens as context.
        """
        ids = [self.eot_id] + self.encode(text)
        total, pos = 0.0, 1
        while pos < len(ids):
            end = min(pos + self.max_length, len(ids))
            start = max(0, end - 1 - self.max_length)
            logits = self._masked(self._extend(ids[start:end - 1], None)[0])
            total += self._logprob(logits[pos - end:], ids[pos:end])[0]
            pos = end
        return total

    @torch.no_grad()
    def greedy(self, context: str, max_new_tokens: int, stop: Sequence[str] = ("\n",)) -> str:
        """Greedy decoding with the KV cache; the prompt is cut from the left so prompt + new tokens fit."""
        if not 0 < max_new_tokens < self.max_length:
            raise FlmError(f"max_new_tokens must be in [1, {self.max_length - 1}] for this model, got {max_new_tokens}")
        ids = self._fit(self.encode(context) or [self.eot_id], self.max_length - max_new_tokens)
        logits, state = self._extend(ids, None)
        out: list[int] = []
        text = ""
        for i in range(max_new_tokens):
            nxt = int(self._masked(logits[-1]).argmax())
            if nxt == self.eot_id:
                break
            out.append(nxt)
            text = self.decode(out)
            cuts = [text.find(s) for s in stop if s and s in text]
            if cuts:
                return text[:min(cuts)]
            if i + 1 < max_new_tokens:
                logits, state = self._extend([nxt], state)
        return text


class FlmScorer(TokenScorer):
    """An FLM model with its tokenizer (built in-process, or loaded from a checkpoint with `load`)."""

    def __init__(self, model, tokenizer, name: str = "flm"):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.max_length = model.cfg.max_seq_len
        self.eot_id = tokenizer.eot_id
        self.vocab_limit = tokenizer.vocab_size
        self.device = model.embed.weight.device

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> FlmScorer:
        from flm.inference import load_for_inference

        model, tokenizer, meta = load_for_inference(path, resolve_device(device))
        return cls(model, tokenizer, name=f"{path} (step {meta.get('step')})")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def _extend(self, ids: list[int], state: Any) -> tuple[torch.Tensor, Any]:
        from flm.model.decoder import KVCache

        if state is None:
            state = KVCache(self.model.cfg, 1, self.device, self.model.embed.weight.dtype)
        return self.model(torch.tensor([ids], device=self.device), cache=state)[0][0], state

    def _branch(self, state: Any, length: int) -> Any:
        state.length = length  # later positions are simply overwritten by the next branch
        return state


class HFScorer(TokenScorer):
    """A causal LM in a local Hugging Face folder, loaded with local_files_only (never touches the network)."""

    def __init__(self, path: str | Path, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False):
        super().__init__()
        require_module("transformers", "eval")
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = resolve_device(device)
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        # A folder's own modeling code (config.json's auto_map) runs only when the user says so, as in transformers
        # and lm-eval: a downloaded folder is a stranger's code.
        if not trust_remote_code and _auto_map(Path(path)):
            raise FlmError(f"{path} ships its own modeling code (config.json has an auto_map); running it needs "
                           "--trust-remote-code (only for folders you trust)")
        dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                           trust_remote_code=trust_remote_code)
            self.model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True,
                                                              trust_remote_code=trust_remote_code,
                                                              **{dtype_key: getattr(torch, dtype)})
        except (OSError, ValueError) as e:
            raise FlmError(f"cannot load a causal LM from {path}: {str(e).splitlines()[0]}") from e
        self.model.to(self.device).eval()
        self.name = str(path)
        cfg = self.model.config
        self.max_length = (getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
                           or self.tokenizer.model_max_length)
        eot = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.tokenizer.bos_token_id
        if eot is None:
            raise FlmError(f"tokenizer in {path} has neither an end-of-text nor a beginning-of-text token")
        self.eot_id = eot
        self.vocab_limit = len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def _extend(self, ids: list[int], state: Any) -> tuple[torch.Tensor, Any]:
        out = self.model(input_ids=torch.tensor([ids], device=self.device), past_key_values=state, use_cache=True)
        return out.logits[0], out.past_key_values

    def _branch(self, state: Any, length: int) -> Any:
        return copy.deepcopy(state)  # the cache grows in place; the kept context state must stay as it is


def _auto_map(folder: Path) -> bool:
    config = folder / "config.json"
    try:
        return config.is_file() and bool(json.loads(config.read_text()).get("auto_map"))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def load_scorer(path: str | Path, device: str = "auto", trust_remote_code: bool = False) -> TokenScorer:
    """Our checkpoint (or run folder) -> FlmScorer; a folder that `flm export hf` wrote -> FlmScorer on flm's own
    model code (the folder's code is never run); any other Hugging Face folder -> HFScorer, whose own modeling
    code runs only with `trust_remote_code`."""
    path = Path(path)
    if not path.exists():
        raise FlmError(f"model path not found: {path}")
    if (path / "config.json").is_file() and not (path / "meta.json").is_file():
        from flm.export.hf import is_flm_export, load_hf_export

        if is_flm_export(path):
            model, tokenizer = load_hf_export(path)
            return FlmScorer(model.to(resolve_device(device)), tokenizer, name=str(path))
        return HFScorer(path, device, trust_remote_code=trust_remote_code)
    return FlmScorer.load(path, device)
