"""μP: width-dependent init, learning rates and readout (rules), and the tools that use them."""

from flm.model.mup_rules import (init_std, is_hidden_matrix, is_matrix, lr_mult, readout_multiplier, weight_decay,
                           width_mult)

__all__ = ["init_std", "is_hidden_matrix", "is_matrix", "lr_mult", "readout_multiplier", "weight_decay",
           "width_mult"]
