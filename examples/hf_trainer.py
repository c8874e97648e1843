"""A learned optimizer in a Hugging Face ``Trainer``: pass it as ``optimizers=(opt, None)``.

    python examples/hf_trainer.py [--steps 30] [--weights unf-mnist1d-rel]

Trains a tiny GPT-2 (built from a config, nothing downloaded) on a few lines of embedded text, byte-level, with the
shipped UNF optimizer ``unf-mnist1d-rel`` (the one that ties tuned Adam on a transformer LM, BENCHMARKS.md; its
spec is derived from the model and an example input). ``--weights`` names other shipped weights, or ``fresh`` for
a DeepSet rule at its hand-set initial weights (momentum SGD plus a small learned term).
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import optimizers

TEXT = (
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate: "
    "Rough winds do shake the darling buds of May, And summer's lease hath all too short a date. "
) * 8


class ByteDataset(torch.utils.data.Dataset):
    def __init__(self, text: str, block: int = 32):
        data = torch.tensor(list(text.encode()), dtype=torch.long)
        self.blocks = data[: len(data) // block * block].view(-1, block)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def main(steps: int = 30, weights: str = "unf-mnist1d-rel") -> float:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=4))
    if weights == "fresh":
        opt = optimizers.LearnedOptimizer(model.parameters(), optimizers.make_rule("deepset"))
    else:  # UNF weights need the model's spec: derived from an example batch of token ids
        opt = optimizers.load(weights, model, example_inputs=(torch.zeros(2, 32, dtype=torch.long),))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=8, logging_steps=10,
                                 report_to=[], save_strategy="no", use_cpu=True, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=ByteDataset(TEXT), optimizers=(opt, None))
        result = trainer.train()
    print(f"final training loss {result.training_loss:.3f} after {steps} steps")
    return result.training_loss


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--weights", default="unf-mnist1d-rel", help="shipped weights name, or 'fresh'")
    args = parser.parse_args()
    main(args.steps, args.weights)
