"""Train a small dense OLMo-2 anchor from scratch, with a byte-level BPE tokenizer trained on the same data.

This is the coordinator's first step in the demo; real deployments start from a released checkpoint
(`flexolmo import-anchor`). The output is a standard Hugging Face directory (`Olmo2ForCausalLM` + fast
tokenizer) that transformers loads as it is. Work in progress lives in `<out>.ckpt/` (tokenizer, checkpoint)
so an interrupted run resumes with `resume=True`; the output directory appears only once training and
evaluation have finished. The tokenizer in the work directory is reused only by a resumed run whose checkpoint
matches (`run_state`): a run that failed before its first checkpoint leaves nothing, and a fresh run never picks
up an earlier run's tokenizer.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field

from flexolmo.core.errors import DataError
from flexolmo.core.fileio import atomic_directory, atomic_write_json
from flexolmo.core.progress import console
from flexolmo.core.provenance import input_hashes, software_versions, utc_now
from flexolmo.data.documents import DEFAULT_HELDOUT_FRACTION, iter_documents, select_split
from flexolmo.data.public_sample import write_public_sample
from flexolmo.data.tokens import load_token_stream
from flexolmo.evaluation.scoring import DEFAULT_EVAL_MAX_SEQUENCES, score_stream
from flexolmo.model.router_init import mean_direction_rows, save_public_rows
from flexolmo.training.loop import OptimConfig, train
from flexolmo.training.run_state import check_work_dir, work_dir_for, work_directory

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# Public sequences averaged into the public router row (the paper samples ~1,000 documents).
PUBLIC_ROUTER_SEQUENCES = 256


class AnchorShape(BaseModel):
    """Size of the dense OLMo-2 to train."""

    vocab_size: int = Field(8192, ge=300, description="BPE vocabulary size, special tokens included")
    hidden_size: int = Field(256, ge=16, description="model width (d_model)")
    num_layers: int = Field(6, ge=1, description="decoder layers")
    num_heads: int = Field(8, ge=1, description="attention heads")
    intermediate_size: int = Field(1024, ge=16, description="SwiGLU hidden width of each FFN")
    max_position_embeddings: int = Field(1024, ge=16, description="longest context the config declares")


class PretrainConfig(BaseModel):
    """`flexolmo pretrain`: everything that decides the anchor."""

    data: list[Path] = Field(description="training text files")
    heldout: list[Path] = Field(default_factory=list, description="held-out files; if empty, a hash split of data")
    out: Path = Field(description="output model directory")
    text_field: str = Field("text", description="JSONL/parquet field with the text")
    heldout_fraction: float = Field(DEFAULT_HELDOUT_FRACTION, ge=0, lt=1, description="hash-split share held out")
    shape: AnchorShape = Field(default_factory=AnchorShape)
    save_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of the written weights (bfloat16 halves the size)")
    eval_max_sequences: int = Field(DEFAULT_EVAL_MAX_SEQUENCES, ge=1,
                                    description="held-out sequences scored after training (the first ones)")
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(steps=1000, batch_size=16, lr=3e-3,
                                                                   weight_decay=0.1))


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE (GPT-2 style, no unknown tokens) wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def build_model(shape: AnchorShape, tokenizer, seed: int):
    """A freshly initialised `Olmo2ForCausalLM` of the given shape."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    if shape.hidden_size % shape.num_heads:
        raise DataError(f"hidden size {shape.hidden_size} is not divisible by {shape.num_heads} heads")
    config = Olmo2Config(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        max_position_embeddings=shape.max_position_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return Olmo2ForCausalLM(config)


def _training_texts(config: PretrainConfig):
    split = "all" if config.heldout else "train"
    for path in config.data:
        for document in select_split(iter_documents(path, config.text_field), split, config.heldout_fraction):
            yield document.text


def _load_or_train_tokenizer(config: PretrainConfig, work: Path):
    from transformers import AutoTokenizer

    saved = work / "tokenizer"
    if not (saved / "tokenizer.json").exists():
        console.print(f"training a {config.shape.vocab_size}-token byte-level BPE tokenizer")
        tokenizer = train_tokenizer(_training_texts(config), config.shape.vocab_size)
        with atomic_directory(saved, overwrite=True) as staging:
            tokenizer.save_pretrained(str(staging))
    return AutoTokenizer.from_pretrained(str(saved))


def pretrain(config: PretrainConfig, resume: bool = False) -> dict:
    """Train the anchor described by `config` and write it to `config.out`; return its summary."""
    if config.out.exists():
        raise DataError(f"{config.out} already exists: choose another --out or remove it")
    work = work_dir_for(config.out)
    check_work_dir(work, resume)
    inputs = input_hashes([*config.data, *config.heldout])
    # The tokenizer is trained on the data, so the data's hashes also stand for it.
    identity = {"settings": config.model_dump(mode="json", exclude={"data", "heldout", "out", "optim"}),
                "data": list(inputs.values())}
    with work_directory(work, resume):
        tokenizer = _load_or_train_tokenizer(config, work)
        split_train, split_heldout = ("all", "all") if config.heldout else ("train", "heldout")
        heldout_files = config.heldout or config.data
        train_stream = load_token_stream(config.data, tokenizer, split_train, config.text_field,
                                         config.heldout_fraction)
        heldout_stream = load_token_stream(heldout_files, tokenizer, split_heldout, config.text_field,
                                           config.heldout_fraction)
        model = build_model(config.shape, tokenizer, config.optim.seed).to(config.optim.device)
        named = [(name, param) for name, param in model.named_parameters()]
        console.print(
            f"anchor: {sum(p.numel() for _, p in named) / 1e6:.2f}M parameters, "
            f"{train_stream.num_tokens:,} training tokens"
        )
        result = train(model, named, train_stream, config.optim, work, resume=resume, description="pretraining",
                       identity=identity)
        # Score what is shipped: weights rounded to the saved dtype, computed in float32.
        model = model.to(getattr(torch, config.save_dtype)).float()
        score = score_stream(model, heldout_stream, config.optim.seq_len,
                             max_sequences=config.eval_max_sequences, device=config.optim.device,
                             description="held-out")
        summary = {
            "kind": "flexolmo-anchor",
            "config": config.model_dump(mode="json"),
            "parameters": sum(p.numel() for _, p in named),
            "train_tokens_available": train_stream.num_tokens,
            "tokens_trained": config.optim.steps * config.optim.tokens_per_step,
            "final_train_loss": result.losses[-1],
            "heldout": score.as_dict(),
            "inputs": inputs,
            "versions": software_versions(),
            "created": utc_now(),
        }
        public_rows = mean_direction_rows(model, train_stream, config.optim.seq_len, PUBLIC_ROUTER_SEQUENCES)
        with atomic_directory(config.out) as staging:
            model.to(getattr(torch, config.save_dtype)).save_pretrained(str(staging))
            save_public_rows(config.out, public_rows, staging=staging)
            # Owners mix this sample of the anchor's own training text into their batches by default.
            write_public_sample(staging, config.data, split_train, config.text_field, config.heldout_fraction)
            tokenizer.save_pretrained(str(staging))
            atomic_write_json(staging / "flexolmo_pretrain.json", summary)
    shutil.rmtree(work)
    return summary
