"""Weights & Biases: the records metrics.jsonl gets, at the same steps, and the run's config,
from rank 0, into ``<dump_folder>/wandb``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tetrad.config.job_config import MetricsConfig
from tetrad.errors import ConfigError

if TYPE_CHECKING:
    import wandb

logger = logging.getLogger(__name__)


class WandbSink:
    """One W&B run per run folder. A start that resumes from a checkpoint continues the W&B run
    the folder names (``wandb/tetrad-run.json``: its id and the last step it holds); a start
    from step 0 begins a new one, as it replaces the folder's history. W&B's history only grows,
    so a resumed start does not send the steps it redoes: W&B keeps the first attempt's records
    of them, where metrics.jsonl and TensorBoard hold the redone ones."""

    def __init__(self, config: MetricsConfig, dump_folder: Path, run_config: dict[str, Any]):
        self.config = config
        self.dump_folder = dump_folder
        self.state_path = dump_folder / "wandb" / "tetrad-run.json"
        self.run_config = run_config
        self.run: wandb.Run | None = None
        self.held_step = 0  # W&B holds the records up to this step from earlier starts

    def open(self, after_step: int) -> None:
        """Start (or continue) the W&B run before the first step after ``after_step``."""
        import wandb

        state = None
        if after_step > 0 and self.state_path.is_file():
            state = json.loads(self.state_path.read_text())
        self.held_step = state["last_step"] if state else 0
        try:
            self.run = wandb.init(
                project=self.config.wandb_project,
                entity=self.config.wandb_entity,
                name=self.config.wandb_run_name or self.dump_folder.resolve().name,
                mode=self.config.wandb_mode,
                dir=self.dump_folder,
                id=state["id"] if state else None,
                resume="allow",
                config=self.run_config,
            )
        except wandb.errors.Error as err:
            message = str(err).strip().splitlines()[0]
            raise ConfigError(
                f"W&B could not start a run: {message} (or use --metrics.wandb_mode offline)"
            ) from err
        if self.held_step > after_step:
            logger.info(
                "W&B run %s holds steps up to %d from an earlier start: steps %d-%d are not "
                "sent again (metrics.jsonl holds the redone ones)",
                self.run.id, self.held_step, after_step + 1, self.held_step,
            )  # fmt: skip
        self._save_state(self.held_step)

    def log(self, record: dict[str, Any], step: int) -> None:
        assert self.run is not None, "open() first"
        if step <= self.held_step:
            return
        self.run.log({key: value for key, value in record.items() if key != "step"}, step=step)
        self._save_state(step)

    def _save_state(self, last_step: int) -> None:
        assert self.run is not None
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        self.state_path.write_text(json.dumps({"id": self.run.id, "last_step": last_step}))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
