"""Our models inside lm-evaluation-harness: the "flm" model type, and `evaluate` for `flm eval harness`.

`FlmLM` answers lm-eval's three request types with the scorers of `flm.eval.scorer`, so a log-likelihood lm-eval
records is exactly the one `flm eval iq` computes for the same text. `pretrained` is one of our checkpoints (or run
folders) or a local Hugging Face causal-LM folder.

lm-eval's own command line only knows models that have been imported, so use it through
`python -m flm.eval.harness_cli --model flm --model_args pretrained=PATH --tasks ...` (the same options as `lm_eval`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# lm-eval's built-in models (such as "hf") register themselves when imported; once the registry holds ours,
# lm-eval no longer imports them by itself, so they are imported first.
import lm_eval.models  # noqa: F401
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from flm.errors import FlmError
from flm.eval.scorer import TokenScorer, load_scorer
from flm.files import write_json_report

log = logging.getLogger("flm.eval")


@register_model("flm")
class FlmLM(LM):
    """lm-eval model over a `TokenScorer`; decoding is greedy only.

    `batch_size` and `max_batch_size` are accepted because lm-eval passes them to every model; requests are
    scored one at a time.
    """

    def __init__(self, pretrained: str | None = None, device: str = "auto", max_gen_toks: int = 256,
                 scorer: TokenScorer | None = None, batch_size: int | str | None = None,
                 max_batch_size: int | None = None, trust_remote_code: bool = False):
        super().__init__()
        if (scorer is None) == (pretrained is None):
            raise FlmError("give the flm lm-eval model exactly one of pretrained=PATH or a scorer")
        self.scorer = scorer if scorer is not None else load_scorer(pretrained, device, bool(trust_remote_code))
        self.max_gen_toks = int(max_gen_toks)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for req in tqdm(requests, desc="loglikelihood", disable=len(requests) < 100):
            result = self.scorer.score(*req.args)
            self.cache_hook.add_partial("loglikelihood", req.args, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=len(requests) < 100):
            result = self.scorer.rolling_loglikelihood(req.args[0])
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, result)
            out.append(result)
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for req in tqdm(requests, desc="generate_until", disable=len(requests) < 100):
            context, gen_kwargs = req.args
            until, max_new = self._generation_args(dict(gen_kwargs))
            result = self.scorer.greedy(context, max_new, stop=until)
            self.cache_hook.add_partial("generate_until", req.args, result)
            out.append(result)
        return out

    def _generation_args(self, kwargs: dict[str, Any]) -> tuple[list[str], int]:
        """(stop strings, token budget clamped to the context) from a task's generation_kwargs."""
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0:
            raise FlmError("the flm lm-eval model decodes greedily only (do_sample=false, temperature=0)")
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        return until, max(1, min(max_new, self.scorer.max_length - 1))


def evaluate(model: str, tasks: Sequence[str], include_paths: Sequence[str] = (), limit: float | None = None,
             num_fewshot: int | None = None, device: str = "auto", json_out: str | None = None,
             trust_remote_code: bool = False) -> dict[str, Any]:
    """Run lm-eval tasks (built-in names, or tasks in YAML folders under `include_paths`) on a model path."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    for path in include_paths:
        if not Path(path).is_dir():
            raise FlmError(f"--include-path {path} is not a folder")
    manager = TaskManager(include_path=list(include_paths) or None)
    unknown = [t for t in tasks if t not in manager.all_tasks and not Path(t).is_file()]
    if unknown:
        raise FlmError(f"unknown lm-eval task(s) {', '.join(unknown)} (add --include-path for local YAML tasks)")
    lm = FlmLM(pretrained=model, device=device, trust_remote_code=trust_remote_code)
    results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager,
                              limit=limit, num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0)
    if json_out:
        fields = ("results", "groups", "configs", "versions", "n-shot", "n-samples")
        write_json_report(json_out, {k: results[k] for k in fields if k in results})
    return results
