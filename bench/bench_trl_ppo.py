"""TRL 1.10's PPOTrainer (trl.experimental.ppo) on SmolLM2-135M: the side-by-side for bench_ppo.py.

Runs in its OWN virtual environment (TRL 1.16, which this project uses, no longer ships PPO)::

    python -m venv /tmp/trl110
    /tmp/trl110/bin/pip install torch==2.13.0
    /tmp/trl110/bin/pip install trl==1.10.0 peft gguf transformers
    /tmp/trl110/bin/python bench/bench_trl_ppo.py --model-dir ~/.cache/rlhf_study/models/smollm2-135m-instruct \
        --mode lora --iterations 1

The model directory is what `rlhf_lib.models.materialize("smollm2-135m-instruct")` returns (safetensors +
tokenizer). The policy, reference, value and reward models are all built from it (the reward and
value heads are freshly initialised: this measures speed and memory, not learning). The last line
printed is one JSON object: episodes/s, seconds, peak RSS. bench_ppo.py --trl-python runs this script.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

DEFAULT_PROMPTS = [
    "Explain why the sky is blue in two sentences.",
    "Write a short poem about a lighthouse.",
    "List three uses for a paperclip.",
]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=str(Path.home() / ".cache/rlhf_study/models/smollm2-135m-instruct"))
    parser.add_argument("--mode", choices=("full", "lora"), default="lora")
    parser.add_argument("--iterations", type=int, default=1, help="PPO batches (rollout + update) to time")
    parser.add_argument("--batch", type=int, default=8, help="episodes per batch (one minibatch)")
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--ppo-epochs", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--prompts", help="JSON file with a list of prompt strings")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prompts = json.loads(Path(args.prompts).read_text()) if args.prompts else DEFAULT_PROMPTS
    # TRL's dataloader drops incomplete batches and then cycles forever: it needs at least one full batch.
    prompts = prompts * -(-args.batch // len(prompts))
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, padding_side="left")
    rows = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
            for p in prompts]
    rows = [r["input_ids"] if isinstance(r, dict) or hasattr(r, "keys") else r for r in rows]
    dataset = Dataset.from_dict({"input_ids": rows})

    fp32 = {"dtype": torch.float32}
    policy = AutoModelForCausalLM.from_pretrained(args.model_dir, **fp32)
    ref_policy = AutoModelForCausalLM.from_pretrained(args.model_dir, **fp32) if args.mode == "full" else None
    value_model = AutoModelForSequenceClassification.from_pretrained(args.model_dir, num_labels=1, **fp32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(args.model_dir, num_labels=1, **fp32)
    for model in (policy, value_model, reward_model):
        model.config.pad_token_id = tokenizer.pad_token_id
    peft_config = None
    if args.mode == "lora":
        peft_config = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    with tempfile.TemporaryDirectory() as out:
        config = PPOConfig(
            output_dir=out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, num_mini_batches=1,
            local_rollout_forward_batch_size=args.batch, total_episodes=args.batch * args.iterations,
            num_ppo_epochs=args.ppo_epochs, response_length=args.response_length, stop_token="eos", temperature=1.0,
            missing_eos_penalty=1.0, kl_coef=0.02, learning_rate=3e-5, num_sample_generations=0, report_to="none",
            save_strategy="no", bf16=False, fp16=False, use_cpu=not torch.cuda.is_available(), logging_steps=1,
            disable_tqdm=True, seed=0,
        )
        trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                             reward_model=reward_model, value_model=value_model, train_dataset=dataset,
                             eval_dataset=dataset, peft_config=peft_config)
        setup_s = time.time() - started
        started = time.time()
        trainer.train()
        train_s = time.time() - started

    episodes = args.batch * args.iterations
    print(json.dumps({
        "design": f"TRL 1.10 PPOTrainer ({args.mode})", "episodes": episodes, "train_s": round(train_s, 2),
        "episodes_per_s": round(episodes / train_s, 4), "setup_s": round(setup_s, 2), "peak_rss_mb": round(peak_rss_mb()),
        "threads": torch.get_num_threads(), "pid": os.getpid(),
    }))


if __name__ == "__main__":
    main()
