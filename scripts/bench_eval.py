"""Evaluation cost per candidate: hf vs vllm backends vs a floor, beside the merge time.

Per candidate (task-arithmetic merges of the zoo specialists, built in place) and per task (a
generation task, zoo_add_gen, and a loglikelihood task, zoo_add; test split):
- merge: InPlaceMerger.build (the candidate's weights written into the resident HF model);
- hf: LmEvalEvaluator.evaluate; floor_hf: the bare work over the same tokens, no harness
  (generation: model.generate, greedy, batches of the same size, left padding; loglikelihood:
  batched forward passes over prompt+answer);
- vllm: VllmEvaluator.evaluate, with the weight swap shown separately; floor_vllm: bare
  LLM.generate over the same token ids (loglikelihood: prompt_logprobs=1, max_tokens=1).
Ratios are against the floor of the same backend, measured in the same run; medians of repeats.

    python scripts/bench_eval.py --quick   # 100 items, 2 candidates, 1 repeat (about a minute after the engine)
    python scripts/bench_eval.py           # 500 items, 3 candidates, 3 repeats (a few minutes)
    python scripts/bench_eval.py --prefix-cache [--quick]   # the vllm backend, prefix caching off/on

--prefix-cache: the few-shot generation task (zoo_rev_gen_2shot) on the vllm backend, one engine
per setting in one run: prefix caching off and on, with vLLM's CPU block (128 tokens) and with
blocks of 32; and zoo_rev_gen with a system instruction before every prompt (a prefix all prompts
share, as a task's fixed few-shot examples are). Per candidate: the evaluation (swap included),
the prompt tokens read from the cache, and the ratio to the caching-off row of the same setting.

Needs vLLM (pip install 'evomerge[vllm]'); threads: 1 by default.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from evomerge.core.env import quiet_libraries  # noqa: E402
from evomerge.evaluation.evaluator import LmEvalEvaluator  # noqa: E402
from evomerge.evaluation.report import Table  # noqa: E402
from evomerge.evaluation.vllm_engine import VllmEvaluator  # noqa: E402
from evomerge.merge.inplace.merger import InPlaceMerger  # noqa: E402
from evomerge.models.folders import load_tokenizer  # noqa: E402
from evomerge.recipes.parameter_space import Recipe  # noqa: E402
from evomerge.zoo.build import ZooParams, build_zoo  # noqa: E402

TASKS = ["zoo_add_gen", "zoo_add"]


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def token_batches(tok, docs, task: str, batch: int):
    """The prompts (and for loglikelihood the answers + EOS) as token ids, in batches."""
    rows = []
    for d in docs:
        ids = tok(d["prompt"], add_special_tokens=False)["input_ids"]
        if not task.endswith("_gen"):
            ids = ids + tok(d["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(ids)
    return [rows[i:i + batch] for i in range(0, len(rows), batch)]


def floor_hf(model, tok, batches, gen: bool) -> None:
    with torch.no_grad():
        for b in batches:
            n = max(map(len, b))
            ids = torch.tensor([[tok.pad_token_id] * (n - len(r)) + r for r in b])
            mask = (ids != tok.pad_token_id).long()
            if gen:
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            else:
                model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)


def floor_vllm(llm, batches, gen: bool) -> None:
    from vllm import SamplingParams, TokensPrompt

    sp = (SamplingParams(temperature=0, max_tokens=8, stop=["\n"]) if gen
          else SamplingParams(temperature=0, prompt_logprobs=1, max_tokens=1, detokenize=False))
    for b in batches:
        llm.generate([TokensPrompt(prompt_token_ids=r) for r in b], sp, use_tqdm=False)


def ta_recipe(base: str, srcs: list[str], w: float) -> Recipe:
    return Recipe.from_dict({"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
                             "models": [{"model": m, "parameters": {"weight": w}} for m in srcs]})


INSTRUCTION = "Reverse the letters between r: and =."  # 37 tokens with BOS: one block of 32 shared
CACHE_SETTINGS = [  # (task, block size, system instruction)
    ("zoo_rev_gen_2shot", None, None), ("zoo_rev_gen_2shot", 32, None), ("zoo_rev_gen", 32, INSTRUCTION)]


def prefix_cache_rows(args, base, srcs, merger, limit, weights, repeats) -> None:
    """The vllm backend's evaluation per candidate with prefix caching off and on (one engine per
    setting, all in this run); the cached prompt tokens counted from vLLM's request outputs."""
    rows = []
    for task, block, instruction in CACHE_SETTINGS:
        off_s = {}
        for caching in (False, True):
            ev = VllmEvaluator([task], split="test", batch_size=args.batch_size, model_dir=srcs[0],
                               prefix_caching=caching, block_size=block, system_instruction=instruction)
            llm = ev.engine().model
            torch.set_num_threads(args.threads)
            real, cached = llm.generate, []

            def generate(*a, real=real, cached=cached, **k):
                out = real(*a, **k)
                cached.extend(o.num_cached_tokens or 0 for o in out)
                return out

            llm.generate = generate
            for w in weights:
                model = merger.build(ta_recipe(base, srcs, w))
                cached.clear()
                secs, _ = timed(lambda ev=ev, m=model: ev.evaluate(m, limit=limit), repeats)
                off_s.setdefault(w, secs)
                rows.append([f"TA w={w}", task + (" + instruction" if instruction else ""), str(block or "128 (vLLM's)"),
                             "on" if caching else "off", f"{secs:.2f}", f"{sum(cached) / max(len(cached), 1):.0f}",
                             f"{off_s[w] / secs:.2f}x"])
                print(*rows[-1], flush=True)
            llm.generate = real
    import os

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    table = Table(f"vllm backend, prefix caching off and on ({limit} test items, batch {args.batch_size}, "
                  f"{args.threads} thread(s), median of {repeats}, load average {load})",
                  ["candidate", "task", "block", "prefix caching", "vllm s", "cached tokens / prompt",
                   "speed-up vs off"], rows)
    table.print()
    print(table.markdown())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=Path("artifacts/zoo"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prefix-cache", action="store_true", help="only the vllm prefix caching rows")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    quiet_libraries()
    torch.set_num_threads(args.threads)
    build_zoo(args.zoo, ZooParams())  # the default zoo (the tests' cached one); a no-op once built
    torch.set_num_threads(args.threads)
    limit, weights, repeats = (100, [0.5, 1.0], 1) if args.quick else (500, [0.5, 0.8, 1.0], 3)
    srcs = [str(args.zoo / f"spec_{s}") for s in ("add", "rev", "sub")]
    base = str(args.zoo / "base")
    merger = InPlaceMerger(srcs, base, "task_arithmetic")
    if args.prefix_cache:
        prefix_cache_rows(args, base, srcs, merger, limit, weights, repeats)
        return 0
    tok = load_tokenizer(args.zoo / "base")
    hf = {t: LmEvalEvaluator([t], split="test", batch_size=args.batch_size) for t in TASKS}
    t0 = time.perf_counter()
    vl = {t: VllmEvaluator([t], split="test", batch_size=args.batch_size, model_dir=srcs[0]) for t in TASKS}
    llm = vl[TASKS[0]].engine().model
    torch.set_num_threads(args.threads)
    print(f"vLLM engine start: {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for w in weights:
        recipe = ta_recipe(base, srcs, w)
        merge_s, model = timed(lambda r=recipe: merger.build(r), repeats)
        for t in TASKS:
            docs = list(hf[t].task(t).eval_docs)[:limit]
            batches = token_batches(tok, docs, t, args.batch_size)
            gen = t.endswith("_gen")
            hf_s, _ = timed(lambda t=t, m=model: hf[t].evaluate(m, tok, limit=limit), repeats)
            fh_s, _ = timed(lambda m=model, b=batches, g=gen: floor_hf(m, tok, b, g), repeats)
            vl_s, _ = timed(lambda t=t, m=model: vl[t].evaluate(m, tok, limit=limit), repeats)
            swap_s = vl[t].swap_s
            fv_s, _ = timed(lambda b=batches, g=gen: floor_vllm(llm, b, g), repeats)
            rows.append([f"TA w={w}", t, f"{merge_s * 1e3:.0f}", f"{hf_s:.2f}", f"{fh_s:.2f}", f"{hf_s / fh_s:.1f}x",
                         f"{vl_s:.2f}", f"{swap_s * 1e3:.0f}", f"{fv_s:.2f}", f"{(vl_s - swap_s) / fv_s:.1f}x",
                         f"{hf_s / vl_s:.1f}x", f"{merge_s / (merge_s + vl_s):.0%}"])
            print(*rows[-1], flush=True)
    import os

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    Table(f"evaluation cost per candidate and task ({limit} test items, batch {args.batch_size}, "
          f"{args.threads} thread(s), load average {load})",
          ["candidate", "task", "merge ms", "hf s", "floor hf s", "hf/floor", "vllm s", "swap ms",
           "floor vllm s", "vllm/floor", "hf/vllm", "merge share (vllm)"], rows).print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
