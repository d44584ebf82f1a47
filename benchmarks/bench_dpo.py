"""DPO step time: our K=4 ensemble versus 4 x our K=1 step and versus 4 x TRL's DPOTrainer step (PEFT adapter).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_dpo.py --model tiny      # ~1 min
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_dpo.py --model smollm2   # ~5 min
    add --quick for a smoke run

Both sides are timed the same way: ``trainer.training_step(model, batch)`` (forward, loss, backward, through
``transformers.Trainer``) + ``optimizer.step()`` + ``zero_grad``, on the same token ids.

- ours: ``RenyiDPOTrainer`` (alpha = 1, beta = 0.1, reference = base with adapters disabled): one ensemble
  forward over K x 2B rows (chosen + rejected) and one shared no-grad reference forward over 2B rows.
- TRL 1.16: ``DPOTrainer`` on a PeftModel with one LoRA adapter (reference = adapter disabled, sigmoid loss,
  ``precompute_ref_log_probs=False``, fp32, no gradient checkpointing), batch from TRL's own
  ``DataCollatorForPreference``. TRL already skips the full logits (its fused, tiled LM head on completion
  positions) and also computes entropy / top-1 metrics per token.

B pairs of T tokens (prompt = first half, chosen / rejected = second half); "4 x single" is 4 x the median.
"""

from __future__ import annotations

import tempfile

import common
import torch


def our_trainer(base, members: int, output_dir: str):
    from renyi_lora.config import DPOConfig
    from renyi_lora.training.dpo import RenyiDPOTrainer

    args = DPOConfig(output_dir=output_dir, num_members=members, rank=common.RANK, lora_alpha=common.LORA_ALPHA,
                     target_modules=common.QV, alpha=1.0, beta=0.1, learning_rate=common.LEARNING_RATE,
                     report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    ensemble = common.make_ensemble(base, members)
    return RenyiDPOTrainer(model=ensemble, args=args)


def trl_trainer(base, tokenizer, output_dir: str):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=output_dir, beta=0.1, learning_rate=common.LEARNING_RATE,
                     precompute_ref_log_probs=False, bf16=False, fp16=False, gradient_checkpointing=False,
                     max_length=None, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    # The dataset is only there because the constructor requires one; timed batches are built below.
    dataset = Dataset.from_dict({"prompt": ["a b"], "chosen": [" c"], "rejected": [" d"]})
    # TRL wraps the plain model itself; given a ready PeftModel it would add a "ref" copy of the adapter and use
    # that as the reference instead of disabling the adapter.
    return DPOTrainer(model=common.shared_copy(base), args=args, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=common.peft_lora_config())


def trainer_step_case(trainer, batch: dict[str, torch.Tensor]):
    optimizer = trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # normally set inside Trainer.train()

    def step():
        trainer.training_step(trainer.model, dict(batch))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def preference_batches(trainer, vocab: int, pairs: int, length: int) -> tuple[dict, dict]:
    """TRL's collated batch of random pairs, and the same rows in our format (labels = -100 off the completion)."""
    generator = torch.Generator().manual_seed(0)
    half = length // 2

    def ids(n):
        return torch.randint(2, vocab, (n,), generator=generator).tolist()

    examples = [{"prompt_ids": ids(half), "chosen_ids": ids(half), "rejected_ids": ids(half)} for _ in range(pairs)]
    trl_batch = trainer.data_collator(examples)
    labels = trl_batch["input_ids"].masked_fill(trl_batch["completion_mask"] == 0, -100)
    ours = {"input_ids": trl_batch["input_ids"], "attention_mask": trl_batch["attention_mask"], "labels": labels}
    return dict(trl_batch), ours


def report(clock: str, times: dict[str, list[float]], chosen: common.Setting) -> None:
    print(f"### {clock}\n\nB = {chosen.batch} pairs ({2 * chosen.batch} rows) of T = {chosen.length} tokens, LoRA "
          f"q_proj, v_proj. Times in ms of {clock}; ratios: median [min-max] of per-round ratios.\n")
    rows = [[name, common.ms(values), common.spread(values)] for name, values in times.items()]
    print(common.markdown_table(["case", "step (ms)", "spread"], rows))
    ours1, ours4, trl_times = times["ours K=1"], times["ours K=4"], times["TRL"]
    rows = [
        ["ours K=4 / (4 x ours K=1)", common.paired_ratio(ours4, ours1, 4), "<= 0.85"],
        ["ours K=4 / (4 x TRL)", common.paired_ratio(ours4, trl_times, 4), "-"],
        ["ours K=1 / TRL", common.paired_ratio(ours1, trl_times), "-"],
    ]
    print()
    print(common.markdown_table(["ratio", "value", "target"], rows))
    print()


def main() -> None:
    args = common.parse_args(__doc__)
    chosen = common.resolve_setting(args)
    common.print_header("DPO step: ours K=4 vs 4 x ours K=1 vs 4 x TRL DPOTrainer (PEFT)", chosen,
                        f"B={chosen.batch} pairs, T={chosen.length} (completion = second half), LoRA r={common.RANK}, "
                        f"lora_alpha={common.LORA_ALPHA:g}; {common.timing_line(chosen)}")
    base, tokenizer = common.load_base(chosen.model)
    tokenizer = tokenizer or common.char_tokenizer()
    with tempfile.TemporaryDirectory() as output_dir:
        trl = trl_trainer(base, tokenizer, output_dir)
        trl_batch, batch = preference_batches(trl, base.config.vocab_size, chosen.batch, chosen.length)
        cases = {
            "ours K=1": trainer_step_case(our_trainer(base, 1, output_dir), batch),
            "ours K=4": trainer_step_case(our_trainer(base, 4, output_dir), batch),
            "TRL": trainer_step_case(trl, trl_batch),
        }
        timings = common.run_interleaved(cases, chosen.warmup, chosen.rounds, chosen.steps)
    for clock, times in timings.clocks().items():
        report(clock, times, chosen)


if __name__ == "__main__":
    main()
