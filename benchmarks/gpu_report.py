"""The summaries of `make gpu-check`: a few lines for the terminal (the end of a GPU window's output) and the
markdown page written beside gpu_check.json. Both read only the report dictionary benchmarks/gpu_check.py builds."""

from __future__ import annotations

TITLES = {"tests": "CUDA tests", "prepare": "Data (flm's own source)", "throughput": "Throughput and MFU",
          "growth": "Growth run"}


def status(part: dict) -> str:
    return f"{part['status']}: {part['reason']}" if part.get("reason") else part["status"]


def pct(x: float | None) -> str:
    return f"{100 * x:.1f}%" if x is not None else "n/a"


def num(x: float | None, fmt: str = ",.0f") -> str:
    return format(x, fmt) if x is not None else "n/a"


def gib(x: float | None) -> str:
    return f"{x:.1f} GiB" if x is not None else "n/a"


def brief(name: str, part: dict) -> str:
    """The one-line gist of a part's numbers ('' when it has none)."""
    if name == "tests" and "counts" in part:
        return ", ".join(f"{n} {k}" for k, n in part["counts"].items() if n)
    if name == "throughput":
        r, mfu = part.get("results", {}), part.get("results", {}).get("mfu") or {}
        bits = [f"{who} {num(r[key]['tokens_per_s'])} tok/s"
                + (f" (MFU {pct(mfu[key]['datasheet'])})" if isinstance(mfu.get(key), dict) else "")
                for key, who in (("flm", "flm"), ("peer", "HF GPT-2")) if key in r]
        if "flm_over_peer" in mfu:
            bits.append(f"flm/HF {mfu['flm_over_peer']:.2f}x")
        llama = r.get("llama") or {}
        lmfu = llama.get("mfu") or {}
        lbits = [f"{who} {num(llama[key]['tokens_per_s'])} tok/s"
                 + (f" (MFU {pct(lmfu[key]['datasheet'])})" if isinstance(lmfu.get(key), dict) else "")
                 for key, who in (("flm", "flm"), ("hf", "HF Llama")) if key in llama]
        if "flm_over_hf" in llama:
            lbits.append(f"flm/HF {llama['flm_over_hf']:.2f}x")
        return ", ".join(bits) + (f"; llama arch: {', '.join(lbits)}" if lbits else "")
    if name == "growth" and part.get("stages"):
        g = part.get("growth")
        rates = " / ".join(num(s["tokens_per_s"]) for s in part["stages"])
        return (f"loss {g['loss_before']:.4f} -> {g['loss_after']:.4f} at growth; " if g else "") + f"{rates} tok/s"
    return ""


def part_line(name: str, part: dict) -> str:
    seconds = f"{part['seconds']:.0f} s" if part.get("seconds") is not None else "-"
    gist = brief(name, part)
    return f"{name:<10} {status(part)[:90]:<40} {seconds:>6}" + (f"  {gist}" if gist else "")


def summary_lines(report: dict) -> list[str]:
    m = report["machine"]
    lines = [f"gpu-check {report['mode']}: {m.get('gpu') or 'no CUDA'}, torch {m['torch']}, "
             f"{report['seconds']} s of {report['deadline_s']:.0f}"]
    lines += [part_line(name, part) for name, part in report["parts"].items()]
    for name, part in report["parts"].items():
        lines += [f"goal: {goal}: {'met' if met else 'NOT met'}" for goal, met in part.get("goals", {}).items()]
    return lines


def machine_lines(report: dict) -> list[str]:
    m, lock = report["machine"], report["compatibility"]["filelock"]
    gpu = (f"{m['gpu']} ({m['gpu_memory_gib']} GiB, compute capability {m['capability']}), driver {m['driver']}, "
           f"CUDA {m['cuda_runtime']}, cuDNN {m['cudnn']}, NCCL {m['nccl']}" if m["cuda"] else "no CUDA device")
    packages = ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v and k != "torch")
    missing = ", ".join(k for k, v in m["packages"].items() if not v)
    shadow = f" (found {lock['found']}; the carried {lock['wheel']} put first)" if lock.get("wheel") else ""
    return [f"- command: `{report['command']}`", f"- date: {report['date']}, commit {report['commit']}",
            f"- machine: {m['host']}, {m['platform']}, {m['cpus']} CPUs; {gpu}",
            f"- Python {m['python']} ({m['executable']}), torch {m['torch']}; {packages}",
            f"- not installed: {missing or 'none of them'}; filelock used: {lock['used']}{shadow}"]


def tests_section(part: dict) -> list[str]:
    rows = [f"| {c['test']} | {c['outcome']} | {c['seconds']:.1f} s | {c['message']} |" for c in part.get("tests", [])]
    return ["| test | outcome | time | message |", "|---|---|---|---|", *rows] if rows else []


def throughput_section(part: dict) -> list[str]:
    r = part.get("results", {})
    if not r:
        return []
    c, mfu, mm = r["config"], r.get("mfu") or {}, r.get("matmul") or {}
    lines = [f"Shape {c['shape']} (layers x width x heads, head dim {c['head_dim']}), vocabulary {c['vocab']:,}, "
             f"sequence {c['seq']}, batch {c['batch']}, {c['dtype']}, compile per block: {c['compile']}, activation "
             f"checkpointing: {c['activation_checkpointing']}; {c['warmup']} warm-up and {c['steps']} timed steps.",
             "", f"FLOPs per token: {num(r.get('flops_per_token'))}, by {r.get('flops_formula', 'n/a')}. "
             f"flm: {num(r.get('params'))} parameters. Ceilings: datasheet dense bf16 "
             f"{num(r.get('datasheet_peak_tflops'))} TFLOP/s; measured {mm.get('size', '?')}^3 bf16 matmul "
             f"{num(mm.get('tflops'), ',.1f')} TFLOP/s.", "",
             *TIMING_HEADER]
    lines += [timing_row(who, r[key], mfu.get(key)) for key, who in (("flm", "flm"), ("peer", "HF GPT-2 (sdpa)"))
              if key in r]
    if mfu.get("skipped"):
        lines += ["", f"MFU: skipped: {mfu['skipped']}."]
    if "flm_over_peer" in mfu:
        lines += ["", f"flm / HF GPT-2: {mfu['flm_over_peer']:.3f}x."]
    if r.get("host_waits"):
        w = r["host_waits"]
        lines += ["", f"Host-device synchronisations in one flm step: {w['count']}"
                  + (f" ({', '.join(f'{k} x{n}' for k, n in w['where'].items())})" if w["where"] else "") + "."]
    if r.get("profile"):
        pr = r["profile"]
        lines += ["", f"One flm step (the FLM shape) profiled: {pr['step_ms']:.1f} ms wall, {pr['busy_ms']:.1f} ms "
                  f"in {pr['of']}. Top by time:", "", "| name | ms | share | calls |", "|---|---|---|---|"]
        lines += [f"| `{row['name']}` | {row['ms']:.2f} | {pct(row['share'])} | {row['calls']} |" for row in pr["top"]]
    lines += llama_lines(r.get("llama"))
    if part.get("goals"):
        lines += ["", *[f"- goal {goal}: {'met' if met else 'not met'}" for goal, met in part["goals"].items()]]
    lines += [f"- error in {k}: `{v.splitlines()[-1]}`" for k, v in r.get("errors", {}).items()]
    return lines


TIMING_HEADER = ["| model | tokens/s | step | peak memory | MFU (datasheet) | MFU (measured matmul) | first step "
                 "| graphs |", "|---|---|---|---|---|---|---|---|"]


def timing_row(who: str, run: dict, m: dict | None) -> str:
    m = m if isinstance(m, dict) else {}
    return (f"| {who} | {num(run['tokens_per_s'])} | {run['step_ms']:.1f} ms | {gib(run['peak_memory_gib'])} | "
            f"{pct(m.get('datasheet'))} | {pct(m.get('matmul'))} | {run['first_step_s']:.1f} s | "
            f"{run['graphs_compiled']} |")


def llama_lines(llama: dict | None) -> list[str]:
    """The llama line: flm's llama arch against HF LlamaForCausalLM of the same shape (none in an older JSON)."""
    if not llama:
        return []
    mfu = llama.get("mfu") or {}
    same = {True: "equal", False: "NOT equal"}.get(llama.get("params_equal"), "not compared")
    counts = " / ".join(f"{num(llama[k]['params'])} ({who})" for k, who in (("flm", "flm"), ("hf", "HF"))
                        if k in llama)
    ratio = llama.get("params_over_flm_shape")
    lines = ["", "Llama arch: flm's `model.arch = \"llama\"` against HF `LlamaForCausalLM` (sdpa), "
             f"{llama['n_layers']} layers x {llama['d_model']}, {llama['n_heads']} heads ({llama['n_kv_heads']} "
             f"key/value) of {llama['head_dim']}, SwiGLU d_ff {llama['d_ff']} ({llama['d_ff_formula']}), RoPE theta "
             f"{num(llama['rope_theta'], 'g')}, tied head. Parameters: {counts or 'n/a'}, {same}"
             + (f"; {ratio:.4f} of the FLM shape's {num(llama['params_of_flm_shape'])}" if ratio else "")
             + f". FLOPs per token: {num(llama.get('flops_per_token'))}, by {llama.get('flops_formula', 'n/a')}.",
             "", *TIMING_HEADER]
    lines += [timing_row(who, llama[key], mfu.get(key)) for key, who in (("flm", "flm (llama arch)"),
                                                                          ("hf", "HF LlamaForCausalLM (sdpa)"))
              if key in llama]
    if mfu.get("skipped"):
        lines += ["", f"MFU: skipped: {mfu['skipped']}."]
    if "flm_over_hf" in llama:
        lines += ["", f"flm / HF Llama: {llama['flm_over_hf']:.3f}x."]
    return lines


def growth_section(part: dict) -> list[str]:
    if not part.get("stages"):
        return []
    lines = ["| stage | up to step | tokens/s | last training loss |", "|---|---|---|---|"]
    lines += [f"| {s['stage']} | {s['steps']} | {num(s['tokens_per_s'])} | {num(s['last_loss'], '.4f')} |"
              for s in part["stages"]]
    g = part.get("growth")
    if g:
        lines += ["", f"Growth at step {g['step']}: {g['params_before']:,} -> {g['params_after']:,} parameters, "
                  f"validation-batch loss {g['loss_before']:.4f} -> {g['loss_after']:.4f}, gradient norm "
                  f"{g['grad_norm_before']:.3f} -> {g['grad_norm_after']:.3f}."]
    return lines + ["", f"Final validation loss: {num(part.get('val_loss'), '.4f')}."]


def markdown(report: dict) -> str:
    lines = [f"# flm GPU check ({report['mode']} mode)", "", *machine_lines(report), "",
             f"Total {report['seconds']} s (deadline {report['deadline_s']:.0f} s).", "",
             "| part | status | time | limit |", "|---|---|---|---|"]
    lines += [f"| {TITLES[name]} | {status(part)} | {part.get('seconds', '-')} s | {part.get('limit_s', '-')} s |"
              for name, part in report["parts"].items()]
    sections = {"tests": tests_section, "throughput": throughput_section, "growth": growth_section}
    for name, part in report["parts"].items():
        body = sections[name](part) if name in sections else []
        if body:
            lines += ["", f"## {TITLES[name]}", "", *body]
    return "\n".join(lines) + "\n"
