"""How router rows start: a small registry, one entry per initialisation.

The paper starts an owner's row `r_i` at the mean embedding of ~1,000 of its documents, from an external
embedder whose width equalled d_model. Our anchors have no such embedder, so the default is the anchor's own
per-layer mean FFN input (the router's actual input) over owner samples; `random` is the control. The public
row `r_pub` is computed once by the coordinator the same way from public samples and shipped with the anchor,
so every owner trains against the same public row.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field

from flexolmo.core.errors import AnchorError, DataError
from flexolmo.core.fileio import atomic_write_bytes
from flexolmo.data.public_sample import write_public_sample
from flexolmo.data.tokens import TokenStream, load_token_stream
from flexolmo.model.anchor import (
    PUBLIC_ROUTER_FILE,
    check_context,
    compute_fingerprint,
    load_anchor,
    read_config,
)
from flexolmo.model.moe import decoder_layers

RANDOM_ROW_STD = 0.02


@torch.no_grad()
def summed_ffn_inputs(model: torch.nn.Module, stream: TokenStream, picks: list[int], seq_len: int,
                      reduce: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 8) -> list[torch.Tensor]:
    """Per layer, the sum over the `picks` sequences' batches of `reduce(FFN input)`, where the input is a
    (batch, seq_len, hidden) float tensor and `reduce` returns a (hidden,) tensor. Zeros when `picks` is empty."""
    layers = decoder_layers(model)
    sums = [torch.zeros(model.config.hidden_size) for _ in layers]

    def capture(index: int):
        def hook(_module, args):
            sums[index] += reduce(args[0].detach().float()).cpu()

        return hook

    handles = [layer.mlp.register_forward_pre_hook(capture(i)) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        model.eval()
        for first in range(0, len(picks), batch_size):
            rows = [torch.from_numpy(stream.sequence(i, seq_len)[:-1]) for i in picks[first : first + batch_size]]
            # The decoder alone: the language-model head (a third of the demo anchor's forward) is not needed.
            model.base_model(input_ids=torch.stack(rows).to(device))
    finally:
        for handle in handles:
            handle.remove()
    return sums


def mean_ffn_inputs(model: torch.nn.Module, stream: TokenStream, seq_len: int,
                    max_sequences: int) -> list[torch.Tensor]:
    """Per layer, the mean over tokens of the FFN's input on up to `max_sequences` sequences of `stream`."""
    num_sequences = min(stream.num_sequences(seq_len), max_sequences)
    if num_sequences < 1:
        raise DataError(f"too little data to initialise the router ({stream.num_tokens} tokens)")
    # Spread the samples over the whole stream rather than taking its head.
    picks = torch.linspace(0, stream.num_sequences(seq_len) - 1, num_sequences).long().tolist()
    sums = summed_ffn_inputs(model, stream, picks, seq_len, lambda hidden: hidden.sum(dim=(0, 1)))
    return [total / (len(picks) * seq_len) for total in sums]


def dp_mean_direction_rows(model: torch.nn.Module, stream: TokenStream, seq_len: int, max_sequences: int,
                           noise_multiplier: float, seed: int) -> tuple[list[torch.Tensor], float]:
    """Per layer, the direction of the mean FFN input over the owner's sequences, released with the Gaussian
    mechanism: each sequence contributes its per-layer mean input as a unit vector scaled by 1/sqrt(layers), so
    one sequence moves the concatenated sum by exactly norm 1 (the sensitivity), and Gaussian noise of standard
    deviation `noise_multiplier` is added to every coordinate of the sum. The sequences are a Poisson sample
    (rate q = max_sequences / N, each sequence decided on its own), so the selection does not depend on the
    other sequences. Returns the rows and q: the release costs one DP-SGD-like step (noise multiplier, q), which
    `privacy.prepare_private_training` composes with the training steps.
    """
    total_sequences = stream.num_sequences(seq_len)
    if total_sequences < 1:
        raise DataError(f"too little data to initialise the router ({stream.num_tokens} tokens)")
    sample_rate = min(1.0, max_sequences / total_sequences)
    draws = np.random.default_rng([seed, 0xD90]).random(total_sequences)
    picks = np.flatnonzero(draws < sample_rate).tolist()
    scale = len(decoder_layers(model)) ** -0.5

    def unit_sequence_means(hidden: torch.Tensor) -> torch.Tensor:
        per_sequence = hidden.mean(dim=1)
        return (per_sequence / per_sequence.norm(dim=-1, keepdim=True).clamp_min(1e-12) * scale).sum(0)

    sums = summed_ffn_inputs(model, stream, picks, seq_len, unit_sequence_means)
    generator = torch.Generator().manual_seed(seed + 0x5EED)
    # An empty Poisson sample leaves the sums at zero: the noise alone is released, as the mechanism requires.
    noisy = [total + torch.randn(total.shape, generator=generator) * noise_multiplier for total in sums]
    return [row / row.norm().clamp_min(1e-6) for row in noisy], sample_rate


def mean_direction_rows(model, stream: TokenStream, seq_len: int, max_sequences: int) -> list[torch.Tensor]:
    """Per layer, the unit vector along the mean FFN input.

    Unit norm, like the paper's sentence-embedding rows: a raw mean has the hidden states' own norm, so logits
    x.r grow like |x|^2 (thousands here) and the router z-loss (1e-3 * logsumexp^2) swamps the language-model
    loss and wrecks training (measured on the demo anchor: z-loss 158 against an LM loss of 6).
    """
    return [row / row.norm().clamp_min(1e-6) for row in mean_ffn_inputs(model, stream, seq_len, max_sequences)]


def mean_hidden_rows(anchor, stream: TokenStream, seq_len: int, max_sequences: int, seed: int) -> list[torch.Tensor]:
    """The direction of the anchor's mean FFN input per layer over the owner's sequences (a statistic of
    private data)."""
    return mean_direction_rows(anchor.model, stream, seq_len, max_sequences)


def random_rows(anchor, stream: TokenStream, seq_len: int, max_sequences: int, seed: int) -> list[torch.Tensor]:
    """Small Gaussian rows, as transformers initialises a router."""
    generator = torch.Generator().manual_seed(seed)
    hidden = anchor.model.config.hidden_size
    return [torch.randn(hidden, generator=generator) * RANDOM_ROW_STD for _ in decoder_layers(anchor.model)]


def public_rows(anchor, stream: TokenStream, seq_len: int, max_sequences: int, seed: int) -> list[torch.Tensor]:
    """A copy of the public row: uses no private data (the choice under differential privacy)."""
    return [row.clone() for row in load_public_rows(anchor.path, len(decoder_layers(anchor.model)))]


RowInit = Callable[[object, TokenStream, int, int, int], list[torch.Tensor]]

ROUTER_INITS: dict[str, RowInit] = {
    "mean_hidden": mean_hidden_rows,
    "random": random_rows,
    "public": public_rows,
}
# Initialisations that read the owner's data outside any privacy mechanism.
READS_PRIVATE_DATA = frozenset({"mean_hidden"})
# mean_hidden released through the Gaussian mechanism (`dp_mean_direction_rows`); only under DP training, whose
# accountant charges it, so it is not in the registry of data-only initialisations above.
DP_ROUTER_INIT = "dp_mean_hidden"


def initial_rows(name: str, anchor, stream: TokenStream, seq_len: int, max_sequences: int, seed: int):
    """Router rows (one (H,) tensor per layer) from the initialisation called `name`, for a loaded anchor."""
    if name not in ROUTER_INITS:
        raise DataError(f"unknown router initialisation '{name}' (choose from {', '.join(ROUTER_INITS)})")
    return ROUTER_INITS[name](anchor, stream, seq_len, max_sequences, seed)


def save_public_rows(anchor_dir: Path, rows: list[torch.Tensor], staging: Path | None = None) -> None:
    """Write the public router rows next to the anchor weights (into `staging` while it is being built)."""
    from safetensors.torch import save

    target = (staging or anchor_dir) / PUBLIC_ROUTER_FILE
    # Atomically: rows are replaced in a published anchor, where a half-written file must never be seen.
    atomic_write_bytes(target, save({f"layers.{i}": row.float().contiguous() for i, row in enumerate(rows)}))


def load_public_rows(anchor_dir: Path, num_layers: int) -> list[torch.Tensor]:
    """The coordinator's public router rows shipped with the anchor."""
    from safetensors.torch import load_file

    path = Path(anchor_dir) / PUBLIC_ROUTER_FILE
    if not path.exists():
        raise AnchorError(
            f"{anchor_dir}: has no public router rows ({PUBLIC_ROUTER_FILE}); the coordinator adds them with "
            "`flexolmo init-router --anchor DIR --public-data PUBLIC_FILE...`"
        )
    tensors = load_file(str(path))
    try:
        return [tensors[f"layers.{i}"] for i in range(num_layers)]
    except KeyError as missing:
        raise AnchorError(f"{path}: missing router row {missing}; recompute it with `flexolmo init-router`") from None


class PublicRowSettings(BaseModel):
    """How much public text `compute_public_rows` averages (the flags of `flexolmo init-router`). Checked where
    used, with the flags' names in the message."""

    seq_len: int = Field(256, description="tokens per averaged sequence")
    sequences: int = Field(256, description="public sequences to average")


def compute_public_rows(
    anchor_dir: Path, data: list[Path], seq_len: int, max_sequences: int, text_field: str, device: str,
    dtype: torch.dtype = torch.float32, force: bool = False,
) -> tuple[str | None, str]:
    """Average public text into the anchor's public router rows and write them beside it, together with the
    public text sample owners mix into their training (`public_sample`).

    Returns the fingerprint before (None when the anchor had no rows) and after. Rows that exist are replaced
    only with `force`: the fingerprint changes, and every package trained on the old one stops verifying."""

    if seq_len < 1 or max_sequences < 1:
        raise DataError(f"--seq-len ({seq_len}) and --sequences ({max_sequences}) must be at least 1")
    anchor_dir = Path(anchor_dir)
    check_context(read_config(anchor_dir).get("max_position_embeddings"), seq_len, anchor_dir)
    had_rows = (anchor_dir / PUBLIC_ROUTER_FILE).exists()
    anchor = load_anchor(anchor_dir, dtype=dtype, device=device)
    if had_rows and not force:
        raise AnchorError(f"{anchor_dir}: already has public router rows (fingerprint {anchor.fingerprint[:16]}); "
                          "recomputing them changes the fingerprint, and every expert package trained on this "
                          "anchor would then fail verification and merge; pass --force to recompute them anyway")
    stream = load_token_stream(data, anchor.tokenizer, "all", text_field)
    save_public_rows(anchor_dir, mean_direction_rows(anchor.model, stream, seq_len, max_sequences))
    write_public_sample(anchor_dir, data, "all", text_field)
    return (anchor.fingerprint if had_rows else None), compute_fingerprint(anchor_dir)
