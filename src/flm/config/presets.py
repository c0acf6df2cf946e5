"""Named model shapes. The paper published only the 101B shape; 16B and 51B are plausible splits
that keep depth 80 and head dim 128 so that FLM's schedule is width growth only (REFERENCE.md §1)."""

PRESETS: dict[str, dict] = {
    # Small enough to train in minutes on two CPU cores.
    "tiny": dict(n_layers=4, d_model=128, n_heads=4, head_dim=32, max_seq_len=256),
    "small": dict(n_layers=8, d_model=256, n_heads=8, head_dim=32, max_seq_len=512),
    # Roughly GPT-2 small / medium in size, with the FLM block.
    "flm-125m": dict(n_layers=12, d_model=768, n_heads=12, head_dim=64, max_seq_len=2048),
    "flm-1b": dict(n_layers=24, d_model=2048, n_heads=16, head_dim=128, max_seq_len=2048),
    # The paper's stages (vocab: cl100k padded to 100,352 rows; output_mult 2.0 at base width 256).
    "flm-16b": dict(n_layers=80, d_model=4096, n_heads=32, head_dim=128, max_seq_len=2048,
                    vocab_size=100352, init_std=1.6e-2, output_mult=2.0, base_width=256, mup=True),
    "flm-51b": dict(n_layers=80, d_model=7168, n_heads=56, head_dim=128, max_seq_len=2048,
                    vocab_size=100352, init_std=1.6e-2, output_mult=2.0, base_width=256, mup=True),
    "flm-101b": dict(n_layers=80, d_model=10240, n_heads=80, head_dim=128, max_seq_len=2048,
                     vocab_size=100352, init_std=1.6e-2, output_mult=2.0, base_width=256, mup=True),
}
