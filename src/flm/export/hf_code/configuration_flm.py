"""Configuration of an FLM decoder exported by `flm export hf` (loaded with `trust_remote_code=True`).

Self-contained on purpose: people load exported models without flm installed, so this file imports only
transformers. Standard Hugging Face names are used where one exists (hidden_size, num_hidden_layers, ...), so
tools that read config.json directly find the shape; the FLM-specific knobs keep flm's names.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class FLMConfig(PretrainedConfig):
    """Shape and parametrisation of a GPT-3-style FLM decoder with xPos rotary positions and a μP readout.

    `num_attention_heads * head_dim` may differ from `hidden_size` (attention has its own inner width).
    Logits are `lm_head(h) * readout_multiplier`, where the multiplier is
    `output_mult * base_width / hidden_size` with `mup`, and `output_mult` without.
    """

    model_type = "flm"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=8192, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, head_dim=32,
                 intermediate_size=512, max_position_embeddings=256, layer_norm_eps=1e-5, rope_theta=10000.0,
                 xpos_scale_base=512.0, output_mult=1.0, base_width=256, mup=False, dropout=0.0,
                 initializer_range=0.02, use_cache=True, tie_word_embeddings=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.layer_norm_eps = layer_norm_eps
        self.rope_theta = rope_theta
        self.xpos_scale_base = xpos_scale_base
        self.output_mult = output_mult
        self.base_width = base_width
        self.mup = mup
        self.dropout = dropout
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        # Passed on rather than set here: transformers 4.x gives it a default of True inside its own __init__.
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def readout_multiplier(self) -> float:
        """The factor on the logits, computed exactly as flm computes it (a plain Python float)."""
        return self.output_mult * (self.base_width / self.hidden_size if self.mup else 1.0)
