"""Read DCP checkpoints back in the test process (with torch's own reader, no process group) and
check what they say about a run: per-parameter gradients and updates against a reference run,
and how each tensor was sharded across the ranks that wrote it."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

MODEL = "model."
EXP_AVG = re.compile(r"^optimizer\.state\.(.+)\.exp_avg$")
_RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")


def step_dir(dump_folder: Path, step: int) -> Path:
    return dump_folder / "checkpoint" / f"step-{step}"


def metadata(folder: Path) -> Metadata:
    return FileSystemReader(str(folder)).read_metadata()


def read_tensors(folder: Path, pattern: str) -> dict[str, torch.Tensor]:
    """Every tensor whose key matches ``pattern``, loaded whole (all shards assembled)."""
    md = metadata(folder).state_dict_metadata
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in md.items()
        if isinstance(meta, TensorStorageMetadata) and re.search(pattern, key)
    }
    assert state, f"no tensor matching {pattern!r} in {folder}"
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.simplefilter("ignore", UserWarning)
        with torch.serialization.safe_globals(_torchao_weight_classes()):
            dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    return state


def _torchao_weight_classes() -> list[type]:
    """torchao's FSDP float8 all-gather weight wrapper: with --float8.enable_fsdp_float8_all_gather
    the checkpoint pickles weights as this class (tetrad does not unwrap them, as it does MXFP8's),
    which a weights-only load refuses unless allowed."""
    try:
        from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor
    except ImportError:
        return []
    return [WeightWithDynamicFloat8CastTensor]


def model_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Parameter FQN → full weight."""
    return {k.removeprefix(MODEL): v for k, v in read_tensors(folder, r"^model\.").items()}


def exp_avgs(folder: Path) -> dict[str, torch.Tensor]:
    """Parameter FQN → Adam's first moment (after step 1: exactly (1 − β1) · the gradient,
    clipped; the clip factor is one scalar, the same in every layout that gets the norm right)."""
    return {
        EXP_AVG.match(k)[1]: v for k, v in read_tensors(folder, EXP_AVG.pattern).items()
    }  # fmt: skip


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64."""
    got, want = got.double(), want.double()
    return float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))


def rel_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per parameter; the two must hold the same parameters, under the same FQNs."""
    assert sorted(got) == sorted(want), "parameter FQNs differ from the reference's"
    for key in want:
        assert got[key].shape == want[key].shape, key
    return {key: rel_error(got[key], want[key]) for key in want}


@dataclass(frozen=True)
class Layout:
    """The parallel degrees of a run, and its pipeline schedule."""

    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    pp_schedule: str = "1F1B"

    @classmethod
    def from_args(cls, args: list[str]) -> Layout:
        """From ``--parallelism.<degree>=N`` arguments (the last one wins, as on the CLI)."""
        values: dict[str, int | str] = {}
        for arg in args:
            m = re.match(r"^--parallelism\.(dp_replicate|dp_shard|cp|tp|pp|pp_schedule)=(.+)$", arg)
            if m:
                values[m[1]] = m[2] if m[1] == "pp_schedule" else int(m[2])
        return cls(**values)  # type: ignore[arg-type]

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp * self.pp

    def shards(self, fqn: str, ndim: int) -> int:
        """How many distinct pieces a parameter (or its optimizer state) is cut into: FSDP over
        dp_shard × cp (replicas over dp_replicate are deduplicated by DCP; DDP keeps it whole),
        times tp for every matrix (the Llama TP plan splits every linear and both embedding
        tables; norms are replicated over tp)."""
        return self.dp_shard * self.cp * (self.tp if ndim >= 2 else 1)

    def stage_ranks(self, fqn: str, n_layers: int) -> set[int]:
        """Global ranks of the pipeline stage that holds ``fqn``: mesh order is (pp,
        dp_replicate, dp_shard, cp, tp), so pp rank r holds ranks [r·w/pp, (r+1)·w/pp).
        GPipe and 1F1B run one stage per rank; the others two, looped (stage s on pp rank
        s mod pp) or, for the V schedules, rank r holding stages r and 2·pp − 1 − r. Blocks
        split evenly; the embedding goes with the first stage, norm and output with the last."""
        per_rank = 1 if self.pp_schedule in ("GPipe", "1F1B") else 2
        stages = self.pp * per_rank
        if m := re.match(r"^layers\.(\d+)\.", fqn):
            stage = int(m[1]) * stages // n_layers
        else:
            stage = 0 if fqn.startswith("tok_embeddings.") else stages - 1
        if self.pp_schedule in ("ZBVZeroBubble", "DualPipeV"):
            pp_rank = stage if stage < self.pp else 2 * self.pp - 1 - stage
        else:
            pp_rank = stage % self.pp
        block = self.world // self.pp
        return set(range(pp_rank * block, (pp_rank + 1) * block))


def param_of(key: str) -> str | None:
    """Parameter FQN of a model weight or of its optimizer moment; None for anything else."""
    if key.startswith(MODEL):
        return key.removeprefix(MODEL)
    m = re.match(r"^optimizer\.state\.(.+)\.(exp_avg|exp_avg_sq)$", key)
    return m[1] if m else None


def check_sharding(folder: Path, layout: Layout, n_layers: int) -> int:
    """Assert that each weight and optimizer moment in the checkpoint was written in exactly
    ``layout.shards`` equal, disjoint pieces that tile it, and (under pipeline parallel) only
    by ranks of the stage that holds it. Returns how many tensors were checked."""
    md = metadata(folder)
    writers: dict[str, set[int]] = {}
    for index, info in md.storage_data.items():
        m = _RANK_FILE.match(info.relative_path)
        assert m, info.relative_path
        writers.setdefault(index.fqn, set()).add(int(m[1]))
    checked = 0
    for key, meta in md.state_dict_metadata.items():
        fqn = param_of(key)
        if fqn is None or not isinstance(meta, TensorStorageMetadata):
            continue
        numel = math.prod(meta.size)
        want = layout.shards(fqn, len(meta.size))
        chunks = meta.chunks
        assert len(chunks) == want, (
            f"{key} {tuple(meta.size)}: {len(chunks)} chunk(s), want {want} for {layout}"
        )
        assert {math.prod(c.sizes) for c in chunks} == {numel // want}, f"{key}: uneven chunks"
        assert len({tuple(c.offsets) for c in chunks}) == want, f"{key}: overlapping chunks"
        assert len(writers[key]) == want, f"{key}: written by ranks {sorted(writers[key])}"
        if layout.pp > 1:
            stage = layout.stage_ranks(fqn, n_layers)
            assert writers[key] <= stage, f"{key}: written by {writers[key]}, stage is {stage}"
        checked += 1
    return checked
