"""Evaluation: the IQ-style benchmark (`flm.eval.iq`) and knowledge benchmarks through lm-evaluation-harness
(`flm.eval.harness`), both over the model-agnostic scorers in `flm.eval.scorer`. See docs/eval.md."""
