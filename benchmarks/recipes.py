"""The measured growth recipes as configs a user trains with: configs/recipes/*.toml, one per horizon where growth
beat the best-tuned scratch run.

It reads the measurements, not the code's hopes: docs/results/growth_horizon.json (three-stage growth, each family,
at 1, 5 and 20 tokens per non-embedding parameter) and docs/results/growth_recipe.json (one late growth under WSD at
20). At each horizon the arm whose worst seed saved the most compute to reach scratch's final loss wins (the
geometric mean over seeds breaks ties), if every seed saved; its best rate and seed-1 schedule are rebuilt with the
benchmark's own build_config (refused if the steps differ from the measured run's: the code moved under the
measurement; nothing is then written or removed) and written with flm.config.config_toml: the measured model,
stages, schedule and rate, on the bundled corpus at the measurement's vocabulary (it runs anywhere in minutes on a
CPU), everything else at flm's defaults (checkpoints, progress, the step guard). The file's comments say what it
measured and how to carry it to another size.

    python benchmarks/recipes.py              # -> configs/recipes/*.toml (old recipes there are replaced)
    python benchmarks/recipes.py --out DIR    # elsewhere
"""

from __future__ import annotations

import argparse
import json
import sys
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import growth_horizon as gh  # noqa: E402  (the benchmarks folder is no package)
import growth_recipe as gr  # noqa: E402

HORIZON_JSON, RECIPE_JSON = Path("docs/results/growth_horizon.json"), Path("docs/results/growth_recipe.json")
# What a run's schedule is made of: copied from the measured run; the rest of [train] is flm's defaults.
RECIPE_TRAIN = ("seed", "lr", "min_lr", "batch_size", "seq_len", "warmup_steps", "max_steps", "schedule",
                "decay_fraction", "decay_shape", "log_every", "eval_every")


def candidates(horizon_doc: dict | None, recipe_doc: dict | None) -> dict[float, list[dict]]:
    """Per horizon, every measured growth arm: where it comes from, its saving, best rate and what rebuilds it."""
    out: dict[float, list[dict]] = {}
    for h in (horizon_doc or {}).get("horizons", []):
        scratch = h["arms"]["scratch"]
        for arm, a in h["arms"].items():
            if arm == "scratch" or not a.get("saving") or not a["saving"].get("geomean"):
                continue
            out.setdefault(float(h["tokens_per_param"]), []).append({
                "source": "growth_horizon", "arm": arm, "saving": a["saving"], "lr": a["best_lr"],
                "steps": a["steps"], "bound": sum(a["steps"]) / sum(scratch["steps"]),
                "scratch": f"cosine, lr {scratch['best_lr']:.3g}",
                "what": f"{arm}: three stages ({' -> '.join(gh_stage_names(arm, horizon_doc))}), cosine"})
    for h in (recipe_doc or {}).get("horizons", []):
        sc = h["scratch"]
        for arm, a in h["arms"].items():
            saving = a.get("saving_finished") or a.get("saving_curve")
            if not saving or not saving.get("geomean"):
                continue
            out.setdefault(float(h["tokens_per_param"]), []).append({
                "source": "growth_recipe", "arm": arm, "f": a["best_f"], "saving": saving, "lr": a["best_lr"],
                "steps": None, "bound": a["bound"], "scratch": f"{sc['best']}, lr {sc['best_lr']:.3g}",
                "what": f"{arm}: one growth after f = {a['best_f']} of the tokens, warmup-stable-decay"})
    return out


def gh_stage_names(arm: str, doc: dict) -> list[str]:
    final = {k: doc["final_model"][k] for k in ("n_layers", "d_model", "n_heads", "d_ff")}
    shapes = gh.stage_shapes(final, gh.FAMILY_ARMS[arm][1])
    return ["{n_layers}x{d_model}/{n_heads}h/{d_ff}".format(**s) for s in shapes]


def winners(found: dict[float, list[dict]]) -> dict[float, dict]:
    """Per horizon, the arm whose worst seed saved the most (the geometric mean breaks ties), when every seed saved:
    a budget is planned on what a schedule saves whatever the seed."""
    best = {h: max(arms, key=lambda a: (a["saving"]["min"], a["saving"]["geomean"])) for h, arms in found.items()}
    return {h: a for h, a in sorted(best.items()) if a["saving"]["min"] > 1}


def setup_of(doc: dict) -> dict:
    """The benchmark's setup dict, enough to rebuild its configs, from its JSON report."""
    from flm.config import ModelConfig

    s, fm = doc["setup"], doc["final_model"]
    preset = gh.PRESETS[s["preset"]]
    setup = {"preset": preset, "final": preset.final, "data_dir": "unused", "out": "unused",
             "final_model": ModelConfig(**preset.final, vocab_size=fm["vocab_size"], max_seq_len=preset.seq_len),
             "eval_batches": s["eval_batches"], "evals": s["evals"]}
    if "decay_fraction" in s:  # growth_recipe's
        setup |= {"operators": {arm: family for arm, (_, family) in gr.ARMS.items()}
                  | {"width-depth": s["width_depth_operator"]}, "lr_at_growth": s["lr_at_growth"],
                  "new_layers": s["new_layers"], "copy_noise": s["copy_noise"],
                  "decay_fraction": s["decay_fraction"], "decay_shape": s["decay_shape"]}
    return setup


def recipe_config(win: dict, horizon: float, doc: dict, name: str):
    """The winner's measured run (seed 1, best rate) as a user runs it."""
    from flm.config import Config, DataConfig, TrainConfig
    from flm.errors import FlmError

    setup = setup_of(doc)
    if win["source"] == "growth_horizon":
        cfg, steps = gh.build_config(win["arm"], horizon, win["lr"], gh.SEEDS[0], setup)
        if steps != win["steps"]:
            raise FlmError(f"{win['arm']} at {horizon:g} tokens/param: today's code builds steps {steps}, the "
                           f"measurement ran {win['steps']}: re-measure before writing its recipe")
    else:
        variant = gr.Variant(win["arm"], "wsd", Fraction(win["f"])).name
        cfg, _ = gr.build_config(variant, horizon, win["lr"], gr.SEEDS[0], setup)
    train = TrainConfig(run_dir=f"runs/recipes/{name}", **{k: getattr(cfg.train, k) for k in RECIPE_TRAIN})
    data = DataConfig(corpus="bundled", dir=f"data/recipes/{name}", vocab_size=setup["preset"].vocab)
    recipe = Config(model=cfg.model, data=data, train=train, stages=cfg.stages)
    recipe.validate()
    return recipe


def header(win: dict, horizon: float, doc: dict, report: Path) -> list[str]:
    s, fm = win["saving"], doc["final_model"]
    per_seed = ", ".join(f"{v:.2f}" for v in s["per_seed"])
    return [f"Growth recipe for about {horizon:g} tokens per non-embedding parameter: {win['what']}.",
            f"Written by `python benchmarks/recipes.py` from {report} ({doc['date'][:10]}, `{doc['command']}`).",
            "",
            f"Measured on the final model {fm['n_layers']} x {fm['d_model']} (N = {fm['non_embedding_params']:,}) "
            f"against the best-tuned scratch run ({win['scratch']}):",
            f"{s['geomean']:.2f}x less compute to reach scratch's final loss (seeds {per_seed}); the schedule's bound "
            f"(FLOPs at equal tokens) is {win['bound']:.2f}x.",
            "",
            "At another size keep the schedule and the stages' operators; set the shapes and the tokens (about "
            f"{horizon:g} x N in all,",
            "each stage's share of the FLOPs as here) and read f, r and the bound with `flm plan` on the file.",
            "The measurement read the Python sources of the installed packages; this file trains on the bundled",
            "corpus so that it runs anywhere: set [data] to your corpus."]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--horizon-json", type=Path, default=HORIZON_JSON)
    p.add_argument("--recipe-json", type=Path, default=RECIPE_JSON)
    p.add_argument("--out", type=Path, default=Path("configs/recipes"))
    args = p.parse_args()
    from flm.config import config_toml
    from flm.errors import FlmError

    paths = {"growth_horizon": args.horizon_json, "growth_recipe": args.recipe_json}
    docs = {src: json.loads(path.read_text()) if path.is_file() else None for src, path in paths.items()}
    written = {}  # every recipe is built before any old one is removed: a refusal leaves the folder as it was
    for horizon, win in winners(candidates(docs["growth_horizon"], docs["growth_recipe"])).items():
        name = f"h{horizon:g}_{win['arm']}"
        doc = docs[win["source"]]
        try:
            cfg = recipe_config(win, horizon, doc, name)
        except FlmError as e:
            sys.exit(f"error: {e}")
        written[args.out / f"{name}.toml"] = (config_toml(cfg, header(win, horizon, doc, paths[win["source"]])),
                                              f"{win['what']}, {win['saving']['geomean']:.2f}x at {horizon:g} "
                                              "tokens/param")
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.toml"):
        old.unlink()
    for path, (text, what) in written.items():
        path.write_text(text)
        print(f"{path}: {what}")

if __name__ == "__main__":
    main()
