"""What the serving tests share: the reference each response is checked against (the same model run alone,
with the whole-model exclusion). The server itself runs through `flexolmo.serve.threaded.running_server`."""

from __future__ import annotations

import torch

from flexolmo.model.moe import decoder_layers
from flexolmo.model.runtime import LoadedModel


@torch.no_grad()
def solo_greedy(loaded: LoadedModel, prompt: str, exclude: list[str], max_tokens: int) -> list[int]:
    """Greedy tokens of the prompt run alone with `exclude` masked for the whole model (no KV cache)."""
    loaded.exclude(exclude)
    try:
        ids = loaded.tokenizer(prompt)["input_ids"]
        out: list[int] = []
        while len(out) < max_tokens:
            token = int(loaded.model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(token)
            if token == loaded.tokenizer.eos_token_id:
                break
        return out
    finally:
        loaded.exclude([])


@torch.no_grad()
def solo_routing(loaded: LoadedModel, ids: list[int], exclude: list[str]) -> torch.Tensor:
    """Each expert's kept routing weight summed over layers and tokens, from each layer's router input."""
    loaded.exclude(exclude)
    inputs = []
    handles = [layer.mlp.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
               for layer in decoder_layers(loaded.model)]
    try:
        loaded.model(torch.tensor([ids]))
        blocks = [layer.mlp for layer in decoder_layers(loaded.model)]
        return sum(block.route(hidden).weights.sum(dim=(0, 1)) for block, hidden in zip(blocks, inputs))
    finally:
        for handle in handles:
            handle.remove()
        loaded.exclude([])


@torch.no_grad()
def solo_logprobs(loaded: LoadedModel, ids: list[int], tokens: list[int], exclude: list[str]) -> torch.Tensor:
    """(len(tokens), vocab): the log-softmax of the next-token logits before each of `tokens`, from one forward of
    the prompt and the tokens run alone with `exclude` masked for the whole model (no KV cache)."""
    loaded.exclude(exclude)
    try:
        logits = loaded.model(torch.tensor([ids + tokens])).logits[0, len(ids) - 1 : len(ids) + len(tokens) - 1]
        return torch.log_softmax(logits.float(), dim=-1)
    finally:
        loaded.exclude([])
