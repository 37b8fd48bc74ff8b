"""The vLLM plugin's core, without vLLM: vLLM's own top-k routing on the masked router logits equals flexolmo's
own (`FlexMoEBlock.route`) for every family's renormalisation and any masks, with the owners' router biases too;
the router hooks reach every MoE layer or fail the forward; the mask table follows vLLM's persistent batch through
removals, additions, one-way moves and swaps; rows expand to a flattened batch's tokens; a request's mask is
resolved as the CPU server resolves it; two different masks or versions never share a cache salt."""

from __future__ import annotations

import importlib
import itertools
import random
import tomllib
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from flexolmo.model.anchor import ANCHOR_FAMILIES
from flexolmo.model.moe import ExpertRouter, FlexMoEBlock, row_masks
from flexolmo.serve.access import AccessError
from flexolmo.serve.follow import ActiveState
from flexolmo.serve.vllm_plugin import MASKED_ARCHITECTURES
from flexolmo.serve.vllm_plugin.core import (
    MASK_ARG,
    MaskRow,
    MaskTable,
    RouterMasks,
    check_mask_arg,
    mask_of,
    mask_row,
    masked_logits,
    moe_routers,
    requests_for_vllm,
    router_bias_table,
    token_masks,
)

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["public", "code", "math", "law"]


def random_masks(generator: torch.Generator, tokens: int, experts: int) -> torch.Tensor:
    masks = torch.rand(tokens, experts, generator=generator) < 0.5
    masks[:, 0] = True  # the public expert is always on
    return masks


def native_top_k(logits: torch.Tensor, top_k: int, renormalize: bool) -> torch.Tensor:
    """(T, E): what vLLM's own top-k softmax routing (`fused_topk`) gives each expert for these router logits:
    the float32 softmax over all experts, its top-k, renormalised when the layer does; zero outside the top-k."""
    weights, ids = torch.softmax(logits.float(), dim=-1).topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return torch.zeros_like(logits, dtype=torch.float32).scatter(-1, ids, weights)


@pytest.mark.parametrize("normalize", sorted({family.normalize_top_k for family in ANCHOR_FAMILIES.values()}))
@pytest.mark.parametrize("experts, top_k", [(2, 1), (2, 2), (4, 1), (4, 2), (4, 3), (7, 2), (7, 7)])
def test_vllms_routing_on_masked_logits_equals_flexolmos_own_block(normalize, experts, top_k):
    generator = torch.Generator().manual_seed(experts * 10 + top_k)
    hidden_size, tokens = 16, 64
    block = FlexMoEBlock([nn.Identity() for _ in range(experts)],
                         ExpertRouter(hidden_size, torch.randn(experts, hidden_size, generator=generator)),
                         top_k, normalize_top_k=normalize)
    hidden = torch.randn(tokens, 1, hidden_size, generator=generator)  # one token per row: a mask per token
    masks = random_masks(generator, tokens, experts)
    with row_masks(block, masks):
        expected = block.route(hidden).weights[:, 0]
    logits = block.gate(hidden)[:, 0]
    routed = native_top_k(masked_logits(logits, masks), top_k, normalize)
    assert torch.allclose(routed, expected, atol=1e-6)
    assert not routed[~masks].any()  # a masked expert gets nothing
    # In the half-precision logits vLLM's routers produce, a masked expert's probability is exactly 0 as well.
    assert not torch.softmax(masked_logits(logits.bfloat16(), masks).float(), dim=-1)[~masks].any()


class Experts(nn.Module):
    """Stands in for vLLM's MoE layer, of which the masks need only how it renormalises: an attribute of the layer
    (`FusedMoE`, vLLM 0.11) or of its router object (`MoERunner.router`, later vLLM: `held_by_router`)."""

    def __init__(self, renormalize: bool, held_by_router: bool = False):
        super().__init__()
        holder = types.SimpleNamespace() if held_by_router else self
        holder.renormalize = renormalize
        if held_by_router:
            self.router = holder


class TupleRouter(nn.Linear):
    """A router that returns (logits, bias), as vLLM's `ReplicatedLinear` does by default."""

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, None]:
        return super().forward(hidden), None


def vllm_like_model(rows: torch.Tensor, layers: int, renormalize: bool = False) -> nn.Module:
    """`model.layers.N.mlp.{gate, experts}` as vLLM's FlexOlmo and Qwen-MoE models name them; layer 1's router
    returns a tuple."""
    model = nn.Module()
    model.layers = nn.ModuleList()
    for layer in range(layers):
        mlp = nn.Module()
        mlp.gate = (TupleRouter if layer == 1 else nn.Linear)(rows.shape[1], rows.shape[0], bias=False)
        with torch.no_grad():
            mlp.gate.weight.copy_(rows)
        mlp.experts = Experts(renormalize)
        decoder = nn.Module()
        decoder.mlp = mlp
        model.layers.append(decoder)
    outer = nn.Module()
    outer.model = model
    return outer


def routed_logits(model: nn.Module, hidden: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's router logits, after checking that a hooked router returns what it returned before: a tensor,
    or a (logits, bias) tuple."""
    outputs = [decoder.mlp.gate(hidden) for decoder in model.model.layers]
    for decoder, output in zip(model.model.layers, outputs):
        if isinstance(decoder.mlp.gate, TupleRouter):
            assert isinstance(output, tuple) and len(output) == 2 and output[1] is None
        else:
            assert isinstance(output, torch.Tensor)
    return [output[0] if isinstance(output, tuple) else output for output in outputs]


def test_router_hooks_mask_every_layer_and_apply_its_owner_biases_as_flexolmos_runtime_does():
    """The owners' kept biases, laid out per layer by `router_bias_table` and added by the hooks before the mask,
    route as flexolmo's runtime does after `--router-bias` (`set_router_bias` on each row)."""
    generator = torch.Generator().manual_seed(7)
    experts, hidden_size, tokens, top_k = 4, 16, 64, 2
    record = [{"name": "public"}, {"name": "code", "router_bias": [-0.5, -1.5]}, {"name": "math"},
              {"name": "law", "router_bias": [-2.0, -0.25]}]
    table = router_bias_table(record, num_layers=2)
    assert table.tolist() == [[0.0, -0.5, 0.0, -2.0], [0.0, -1.5, 0.0, -0.25]]
    rows = torch.randn(experts, hidden_size, generator=generator)
    hidden = torch.randn(tokens, hidden_size, generator=generator)
    masks = random_masks(generator, tokens, experts)
    model, plain = vllm_like_model(rows, layers=2), vllm_like_model(rows, layers=2)
    biased, unbiased = RouterMasks(table), RouterMasks()
    biased.install(moe_routers(model.named_modules(), renormalize=False))
    unbiased.install(moe_routers(plain.named_modules(), renormalize=False))
    with torch.no_grad(), biased.masking(masks):
        hooked = routed_logits(model, hidden)
    with torch.no_grad(), unbiased.masking(masks):
        hooked_plain = routed_logits(plain, hidden)
    for layer in range(2):
        block = FlexMoEBlock([nn.Identity() for _ in range(experts)], ExpertRouter(hidden_size, rows, [1, 3]),
                             top_k)
        with torch.no_grad():
            for expert in (1, 3):
                block.gate.rows[expert].bias.fill_(table[layer, expert])
        with row_masks(block, masks):
            expected = block.route(hidden[:, None]).weights[:, 0]
        assert torch.allclose(native_top_k(hooked[layer], top_k, False), expected, atol=1e-6)
        assert not torch.allclose(native_top_k(hooked_plain[layer], top_k, False), expected, atol=1e-3)


def test_a_forward_that_routes_around_the_hooks_fails_instead_of_serving_unmasked():
    rows = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    model, routing = vllm_like_model(rows, layers=2), RouterMasks()
    routing.install(moe_routers(model.named_modules(), renormalize=False))
    masks = torch.ones(5, 3, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="outside a masked forward"):
        model.model.layers[0].mlp.gate(torch.randn(5, 8))  # before any forward
    with pytest.raises(RuntimeError, match="reached 1 of 2 MoE routers"), routing.masking(masks):
        model.model.layers[0].mlp.gate(torch.randn(5, 8))  # layer 1 routed some other way
    with pytest.raises(RuntimeError, match="outside a masked forward"):
        model.model.layers[0].mlp.gate(torch.randn(5, 8))  # after one
    with routing.masking(masks):
        routed_logits(model, torch.randn(5, 8))  # every router reached: no error


def test_a_model_whose_moe_layers_the_hooks_cannot_all_reach_is_refused():
    rows = torch.randn(3, 8)
    model = vllm_like_model(rows, layers=2)
    del model.model.layers[1].mlp.gate  # experts whose router is somewhere else
    with pytest.raises(ValueError, match=r"routers in layers \[0\] and experts in layers \[0, 1\]"):
        moe_routers(model.named_modules(), renormalize=False)
    with pytest.raises(ValueError, match="routers in layers"):
        moe_routers(nn.Linear(2, 2).named_modules(), renormalize=False)
    with pytest.raises(ValueError, match="renormalize=False, the checkpoint says norm_topk_prob=True"):
        moe_routers(vllm_like_model(rows, layers=2).named_modules(), renormalize=True)
    later = vllm_like_model(rows, layers=2)
    for layer in later.model.layers:
        layer.mlp.experts = Experts(True, held_by_router=True)
    assert len(moe_routers(later.named_modules(), renormalize=True)) == 2
    with pytest.raises(ValueError, match="renormalize=True, the checkpoint says norm_topk_prob=False"):
        moe_routers(later.named_modules(), renormalize=False)
    later.model.layers[1].mlp.experts = nn.Module()  # says nothing about renormalising
    with pytest.raises(ValueError, match="layer 1 routes with renormalize=unknown"):
        moe_routers(later.named_modules(), renormalize=True)


class PersistentBatch:
    """vLLM's persistent batch as its logits processors see it: a removal leaves a hole, an addition takes the
    lowest hole (or the end), `condense` moves the last request into the lowest hole (one-way), a reorder
    swaps two; each change is reported as vLLM's `BatchUpdate` reports it."""

    def __init__(self):
        self.slots: list[str | None] = []
        self.removed, self.added, self.moved = [], [], []

    def remove(self, request: str) -> None:
        index = self.slots.index(request)
        self.slots[index] = None
        self.removed.append(index)

    def add(self, request: str, extra_args: dict | None) -> None:
        holes = [index for index, slot in enumerate(self.slots) if slot is None]
        index = holes[0] if holes else len(self.slots)
        if holes:
            self.slots[index] = request
            if index in self.removed:  # vLLM reports a refilled index as added only
                self.removed.remove(index)
        else:
            self.slots.append(request)
        self.added.append((index, extra_args))

    def condense(self) -> None:
        while None in self.slots:
            if self.slots[-1] is None:
                self.slots.pop()
                continue
            hole, last = self.slots.index(None), len(self.slots) - 1
            self.slots[hole], self.slots[last] = self.slots[last], None
            self.moved.append((last, hole, False))

    def swap(self, first: int, second: int) -> None:
        self.slots[first], self.slots[second] = self.slots[second], self.slots[first]
        self.moved.append((first, second, True))

    def flush(self, table: MaskTable) -> None:
        table.update(len(self.slots), list(self.removed), list(self.added), list(self.moved))
        self.removed, self.added, self.moved = [], [], []


def test_the_mask_table_follows_the_persistent_batch():
    rng = random.Random(0)
    table, batch = MaskTable(len(NAMES)), PersistentBatch()
    assert table.installed is False  # until a logits processor keeps it; the model refuses to load before
    masks: dict[str, tuple[bool, ...]] = {}
    running: list[str] = []
    for step in range(300):
        for _ in range(rng.randint(0, 2)):
            if running and rng.random() < 0.5:
                gone = running.pop(rng.randrange(len(running)))
                batch.remove(gone)
        for _ in range(rng.randint(0, 3)):
            name = f"r{step}-{len(running)}"
            masks[name] = (True, *(rng.random() < 0.5 for _ in NAMES[1:]))
            running.append(name)
            batch.add(name, {MASK_ARG: [int(flag) for flag in masks[name]], "other": 1})
        batch.condense()
        if len(batch.slots) > 1 and rng.random() < 0.3:
            batch.swap(*rng.sample(range(len(batch.slots)), 2))
        batch.flush(table)
        assert table.size == len(batch.slots) == len(running)
        expected = [masks[name] for name in batch.slots]
        assert table.batch(table.size).tolist() == [list(mask) for mask in expected]


def test_a_one_way_move_replaces_its_target_and_a_swap_exchanges():
    table, rows = MaskTable(3), [(True, True, False), (True, False, True), (True, True, True)]
    table.update(3, [], [(index, {MASK_ARG: [int(flag) for flag in row]}) for index, row in enumerate(rows)], [])
    table.update(3, [], [], [(0, 2, True)])
    assert table.batch(3).tolist() == [list(rows[2]), list(rows[1]), list(rows[0])]
    table.update(2, [], [], [(2, 1, False)])
    assert table.batch(3).tolist() == [list(rows[2]), list(rows[0]), [True, False, False]]


def test_a_request_without_a_fitting_mask_runs_the_public_expert_only():
    public = [True, False, False, False]
    assert mask_of(None, 4) == mask_of({}, 4) == mask_of({MASK_ARG: [1, 1]}, 4) == tuple(public)
    assert mask_of({MASK_ARG: [0, 1, 1, 1]}, 4) == tuple(public)  # public off is not a mask
    assert mask_of({MASK_ARG: [1, 0, 1, 1]}, 4) == (True, False, True, True)
    for bad in ([0, 1], [1, 2], "1011", [], [1, 0.5]):
        with pytest.raises(ValueError, match=MASK_ARG):
            check_mask_arg(bad)
    assert MaskTable(4).batch(2).tolist() == [public, public]


def test_rows_expand_to_the_flattened_tokens_of_their_requests():
    rows = torch.tensor([[1, 1, 0], [1, 0, 1], [1, 0, 0]], dtype=torch.bool)
    masks = token_masks(rows, torch.tensor([0, 2, 5, 6]), num_tokens=8)
    assert masks.tolist() == [rows[0].tolist()] * 2 + [rows[1].tolist()] * 3 + [rows[2].tolist()] \
        + [[True, False, False]] * 2  # the padding: public only
    with pytest.raises(ValueError, match="own 6 tokens"):
        token_masks(rows, torch.tensor([0, 2, 5, 6]), num_tokens=5)
    exact = token_masks(rows, torch.tensor([0, 2, 5, 6]), num_tokens=6)  # no padding
    assert exact.dtype == torch.bool and exact.tolist() == masks.tolist()[:6]
    # More experts than rows: the table's row count, not its width, bounds the requests.
    wide = torch.ones(2, 5, dtype=torch.bool)
    assert token_masks(wide, torch.tensor([0, 1, 3]), num_tokens=3).tolist() == [[True] * 5] * 3
    with pytest.raises(ValueError, match="the forward has 3 requests but the mask table 2 rows"):
        token_masks(wide, torch.tensor([0, 1, 2, 3]), num_tokens=3)


def test_a_requests_mask_is_resolved_as_the_cpu_server_resolves_it():
    active = ActiveState((True, True, False, True), version=7)  # math withdrawn
    everyone = frozenset(NAMES)
    assert mask_row(NAMES, everyone, None, active) == MaskRow((True, True, False, True), 7)
    assert mask_row(NAMES, everyone, ["law"], active) == MaskRow((True, False, False, True), 7)
    assert mask_row(NAMES, frozenset({"public", "code"}), [], active).mask == (True, False, False, False)
    with pytest.raises(AccessError, match="may not use expert.s. law"):
        mask_row(NAMES, frozenset({"public", "code"}), ["law"], active)


def test_different_masks_or_versions_never_share_a_cache_salt():
    masks = [(True, *flags) for flags in itertools.product([False, True], repeat=3)]
    rows = [MaskRow(mask, version) for mask in masks for version in (None, 1, 2)]
    salts = [row.salt() for row in rows]
    assert len(set(salts)) == len(rows) and salts == [row.salt() for row in rows]
    prompt, extra = requests_for_vllm([[5, 6, 7]], [rows[4]])[0]
    assert prompt == {"prompt_token_ids": [5, 6, 7], "cache_salt": rows[4].salt()}
    assert extra == {MASK_ARG: [int(flag) for flag in rows[4].mask]}


def test_the_plugin_is_registered_for_every_merged_family():
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["vllm.general_plugins"]
    module, _, name = entry["flexolmo"].partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    assert {family.moe_architecture for family in ANCHOR_FAMILIES.values()} <= set(MASKED_ARCHITECTURES)
