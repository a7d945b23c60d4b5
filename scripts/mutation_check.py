"""Do the parity tests catch the bugs they exist for? Plant each bug in a copy of the repo and
run the tests meant to catch it there; a bug the tests do not fail on has SURVIVED.

    .venv/bin/python scripts/mutation_check.py                 # every mutation, this checkout's tests
    .venv/bin/python scripts/mutation_check.py cp_k_grad_half  # some of them
    .venv/bin/python scripts/mutation_check.py --tests-rev=HEAD~5  # the tests of an older commit

Each mutation is a textual replacement in a tetrad/ source file, so the texts track the source:
when the code changes, the script stops with "mutation target not found" (the old text must
occur exactly once) and the mutation must be rewritten for the new code. The copy holds the
working tree as it is (tracked and untracked, not ignored, files). Slow: each mutation runs its
tests (a few multi-process runs, and the session's trained-weights fixture) on the CPU.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARITY = "tests/distributed/test_parity.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    file: str
    replacements: tuple[tuple[str, str], ...]
    tests: tuple[str, ...]  # pytest node ids


def layout_test(case: str) -> str:
    return f"{PARITY}::test_layout_matches_single_process[{case}]"


MUTATIONS = [
    Mutation(
        "cp_k_grad_half",
        "context parallel: the key gradient halved (forward unchanged)",
        "tetrad/models/attention.py",
        (
            (
                "        keys = repeat_kv(self.cp.gather_sequence(k), n_rep)\n",
                "        k = k * 0.5 + (k * 0.5).detach()\n"
                "        keys = repeat_kv(self.cp.gather_sequence(k), n_rep)\n",
            ),
        ),
        (layout_test("cp2"),),
    ),
    Mutation(
        "cp_positions",
        "context parallel: each rank's second chunk gets its first chunk's rotary positions",
        "tetrad/trainer.py",
        (
            (
                "positions = self.context_parallel.positions\n",
                "positions = self.context_parallel.positions[: self.context_parallel.chunk]"
                ".repeat(2)\n",
            ),
        ),
        (layout_test("cp2"),),
    ),
    Mutation(
        "pp_positions",
        "pipeline: the second half of each sequence gets the first half's rotary positions",
        "tetrad/trainer.py",
        (
            (
                "positions = torch.arange(inputs.shape[1])\n",
                "positions = torch.arange(inputs.shape[1]) % (inputs.shape[1] // 2)\n",
            ),
        ),
        (f"{PARITY}::test_pipeline_matches_single_process[pp2_gpipe]",),
    ),
    Mutation(
        "token_count_unreduced",
        "the loss's token count not summed over the data-parallel ranks",
        "tetrad/trainer.py",
        (
            (
                "global_tokens = reduce_sum(torch.tensor(float(num_tokens), device=self.device), "
                "loss_mesh)",
                "global_tokens = torch.tensor(float(num_tokens), device=self.device)",
            ),
        ),
        (layout_test("fsdp2"),),
    ),
    Mutation(
        "cp_grads_unreduced",
        "context parallel alone: no FSDP over the cp ranks, so no gradient reduction across them",
        "tetrad/distributed/parallel_dims.py",
        (("return self.dp_shard * self.cp > 1", "return self.dp_shard > 1"),),
        (layout_test("cp2"),),
    ),
    Mutation(
        "fsdp_replicates",
        "FSDP silently replicated: DDP over the same ranks (the same gradients, nothing sharded)",
        "tetrad/distributed/parallelize.py",
        (
            ("    if parallel_dims.fsdp_enabled:\n", "    if False:\n"),
            (
                '    elif parallel_dims.dp_replicate > 1:\n        apply_ddp(model, block_list, meshes["dp_replicate"],',
                "    elif parallel_dims.dp_replicate > 1 or parallel_dims.fsdp_enabled:\n"
                '        apply_ddp(model, block_list, meshes["dp_cp"],',
            ),
        ),
        (layout_test("fsdp2"),),
    ),
    Mutation(
        "float8_off",
        "float8 silently off: nothing converted, yet the log still counts the eligible linears",
        "tetrad/models/float8.py",
        (
            (
                "    convert_to_float8_training(model, config=float8_config, "
                "module_filter_fn=module_filter)\n"
                "    return sum(isinstance(m, Float8Linear) for m in model.modules())\n",
                "    del float8_config, Float8Linear, convert_to_float8_training\n"
                "    return sum(module_filter(m, n) for n, m in model.named_modules())\n",
            ),
        ),
        (
            f"{PARITY}::test_float8_with_fsdp_float8_all_gather",
            f"{PARITY}::test_float8_tensor_parallel_matches_single_process[tensorwise]",
            "tests/integration/test_float8.py::test_float8_converts_linears_and_tracks_fp32[rowwise]",
        ),
    ),
    Mutation(
        "head_norm_grads_unreduced",
        "tensor parallel: Qwen3's per-head q/k norms left plain, so each rank keeps the gradient "
        "of its own heads only (the forward is unchanged)",
        "tetrad/distributed/tensor_parallel.py",
        (("        for name in r.head_norms:\n", "        for name in ():\n"),),
        ("tests/distributed/test_hf_parity.py::test_hf_layout_matches_single_process[qwen3_tp2]",),
    ),
]


def copy_repo(dest: Path) -> None:
    """The working tree as it is: tracked and untracked files that git does not ignore."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout.split("\0")  # fmt: skip
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def use_tests_of(rev: str, dest: Path) -> None:
    """Replace the copy's tests/ with those of commit ``rev``."""
    shutil.rmtree(dest / "tests")
    archive = subprocess.run(
        ["git", "archive", rev, "tests"], cwd=REPO, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def _defined(root: Path, node: str) -> bool:
    path, _, name = node.partition("::")
    file = root / path
    return file.is_file() and f"def {name.split('[')[0]}(" in file.read_text()


def mutate(root: Path, mutation: Mutation) -> None:
    path = root / mutation.file
    text = path.read_text()
    for old, new in mutation.replacements:
        count = text.count(old)
        if count != 1:
            raise SystemExit(
                f"{mutation.name}: mutation target not found exactly once in {mutation.file} "
                f"({count} occurrences) — the source changed; update the mutation:\n{old}"
            )
        text = text.replace(old, new)
    path.write_text(text)


def run(mutation: Mutation, tests_rev: str | None, keep: bool) -> tuple[str, float, str, list[str]]:
    """PASS (every test failed, as it must) or SURVIVED k/n (k of the n tests passed), the
    seconds taken, and pytest's first error line."""
    root = Path(tempfile.mkdtemp(prefix=f"mutation-{mutation.name}-"))
    try:
        copy_repo(root)
        if tests_rev:
            use_tests_of(tests_rev, root)
        mutate(root, mutation)
        # Tests that the copy's tests/ (another revision's, maybe) does not define are left out.
        tests = [t for t in mutation.tests if _defined(root, t)]
        if not tests:
            return "NO TESTS", 0.0, "", []
        begin = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *tests],
            cwd=root, capture_output=True, text=True,
        )  # fmt: skip
        took = time.perf_counter() - begin
        out = result.stdout + result.stderr
        if result.returncode not in (0, 1):  # collection or usage error: nothing was tested
            raise SystemExit(f"{mutation.name}: pytest exited {result.returncode}:\n{out[-3000:]}")
        passed = [line for line in out.splitlines() if line.startswith("PASSED ")]
        failed = [line for line in out.splitlines() if line.startswith("FAILED ")]
        # Every test meant to catch the bug must fail on it.
        verdict = (
            "PASS"
            if failed and not passed
            else f"SURVIVED {len(passed)}/{len(passed) + len(failed)}"
        )
        why = next((line for line in out.splitlines() if line.startswith("E ")), "")
        return verdict, took, why.strip()[:150], tests
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--tests-rev", help="use tests/ of this git revision instead")
    parser.add_argument("--keep", action="store_true", help="keep the mutated copies")
    args = parser.parse_args()
    known = {m.name: m for m in MUTATIONS}
    if unknown := [n for n in args.names if n not in known]:
        raise SystemExit(f"unknown mutation(s) {unknown}; known: {list(known)}")
    chosen = [known[n] for n in args.names] if args.names else MUTATIONS
    # Every target first: a stale one stops the script before anything slow runs.
    for mutation in chosen:
        text = (REPO / mutation.file).read_text()
        for old, _ in mutation.replacements:
            if text.count(old) != 1:
                raise SystemExit(f"{mutation.name}: mutation target not found in {mutation.file}")
    print(f"{'mutation':24} {'verdict':9} {'s':>5}  tests / first failure", flush=True)
    survived = 0
    for mutation in chosen:
        verdict, took, why, ran = run(mutation, args.tests_rev, args.keep)
        survived += verdict.startswith("SURVIVED")
        tests = ", ".join(t.split("::")[-1] for t in ran)
        print(f"{mutation.name:24} {verdict:9} {took:5.0f}  {tests}", flush=True)
        print(f"{'':40}{mutation.what}" + (f"\n{'':40}{why}" if why else ""), flush=True)
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()
