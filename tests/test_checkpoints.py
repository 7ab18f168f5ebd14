"""Checkpoints and exports are written atomically wherever TMPDIR is: a save killed or failing mid-write
leaves the previous checkpoint (or none) at the final name, never a truncated one, and the next save or
start removes what it left behind. Checked for the strategies of configs/: one device, DDP, FSDP2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml

from lightning_vlm.cli import VLMCLI
from lightning_vlm.export import ExportHF

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "zoo" / "tiny_qwen2vl_sft.yaml"


def _cli_trainer(fragment: str, tmp_path: Path) -> L.Trainer:
    """The trainer the command builds for the tiny recipe stacked with ``configs/<fragment>.yaml``."""
    args = ["--config", str(TINY), "--config", str(ROOT / "configs" / f"{fragment}.yaml"),
            "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    return VLMCLI(args=args, run=False).trainer


def _state(n: int, value: float) -> dict:
    return {"state_dict": {"w": torch.full((n,), value)}, "global_step": int(value)}


def _listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


@pytest.fixture(params=["cpu", "ddp_cpu"], ids=["one-device", "ddp"])
def cli_io(request, tmp_path):
    """The CheckpointIO the command gives the strategy (DDP saves through it on rank 0)."""
    return _cli_trainer(request.param, tmp_path).strategy.checkpoint_io


KILLED_SAVE = """
import importlib, resource, signal, sys, torch
module, name = sys.argv[1].rsplit(".", 1)
io = getattr(importlib.import_module(module), name)()
state = {"state_dict": {"w": torch.full((1 << 20,), 2.0)}, "global_step": 2}  # 4 MiB
# The kernel kills the process when a file passes 2 MiB, mid-write, as a kill -9 would (Python ignores
# SIGXFSZ by default and would raise instead).
resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
io.save_checkpoint(state, sys.argv[2])
"""


def _other_filesystem(tmp_path: Path) -> Path:
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)) or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no writable second filesystem (/dev/shm) here")
    folder = shm / f"lvlm-test-{os.getpid()}-{tmp_path.name}"
    folder.mkdir()
    return folder


@pytest.mark.parametrize("tmpdir", ["same-filesystem", "other-filesystem"])
def test_killed_save_leaves_no_truncated_checkpoint_and_no_temp_file(cli_io, tmpdir, tmp_path, monkeypatch):
    temp = tmp_path / "tmpdir" if tmpdir == "same-filesystem" else _other_filesystem(tmp_path)
    temp.mkdir(exist_ok=True)
    try:
        folder = tmp_path / "checkpoints"
        cli_io.save_checkpoint(_state(1 << 20, 1.0), folder / "last.ckpt")  # the previous checkpoint
        env = {**os.environ, "TMPDIR": str(temp)}
        io_class = f"{type(cli_io).__module__}.{type(cli_io).__qualname__}"
        for name in ("last.ckpt", "step=20.ckpt"):  # overwritten, and new
            done = subprocess.run([sys.executable, "-c", KILLED_SAVE, io_class, str(folder / name)], env=env,
                                  capture_output=True, text=True, timeout=300)  # fmt: skip
            assert done.returncode < 0, done.stderr[-2000:]  # killed by a signal mid-write
        assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 1  # the previous, whole
        assert not (folder / "step=20.ckpt").exists()  # never a truncated file at the final name
        monkeypatch.setenv("TMPDIR", str(temp))
        cli_io.save_checkpoint(_state(16, 3.0), folder / "step=30.ckpt")  # the next save cleans up
        assert _listing(folder) == {"last.ckpt", "step=30.ckpt"}
        assert _listing(temp) == set(), "a killed save left a temporary file in TMPDIR"
    finally:
        if tmpdir == "other-filesystem":
            import shutil

            shutil.rmtree(temp, ignore_errors=True)


def test_save_that_fails_mid_write_keeps_the_previous_checkpoint(cli_io, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmpdir"))
    (tmp_path / "tmpdir").mkdir()
    folder = tmp_path / "checkpoints"
    cli_io.save_checkpoint(_state(1 << 16, 1.0), folder / "last.ckpt")
    real_save = torch.save

    def half_then_crash(obj, f, *args, **kwargs):
        import io

        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2]) if hasattr(f, "write") else Path(f).write_bytes(
            data[: len(data) // 2]
        )
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", half_then_crash)
    for name in ("last.ckpt", "step=20.ckpt"):
        with pytest.raises(OSError, match="simulated"):
            cli_io.save_checkpoint(_state(1 << 16, 2.0), folder / name)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 1
    assert _listing(folder) == {"last.ckpt"} and _listing(tmp_path / "tmpdir") == set()


class _Sharded(L.LightningModule):
    """A tiny model that FSDP2 shards in configure_model, as the objectives do."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(8, 8)

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        fully_shard(self.layer, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 8)), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fsdp_strategy():
    """The FSDP2 strategy that configs/fsdp_cpu.yaml names, for one process."""
    spec = yaml.safe_load((ROOT / "configs" / "fsdp_cpu.yaml").read_text())["trainer"]["strategy"]
    module, name = spec["class_path"].rsplit(".", 1)
    return getattr(__import__(module, fromlist=[name]), name)(data_parallel_size=1, tensor_parallel_size=1)


def test_fsdp2_checkpoint_folder_is_replaced_whole(tmp_path, monkeypatch):
    """A distributed checkpoint is a folder (shards and meta.pt); a save that fails after writing some of
    it leaves the previous folder as it was, and no half-written folder at a new name."""
    environ, threads = dict(os.environ), torch.get_num_threads()  # the strategy sets LOCAL_RANK, threads, ...
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=_fsdp_strategy(), max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    try:
        trainer.fit(_Sharded())
        last = tmp_path / "ckpt" / "last.ckpt"
        trainer.save_checkpoint(last)
        before = {p.name: p.read_bytes() for p in last.iterdir()}
        import lightning.pytorch.strategies.model_parallel as model_parallel

        def partly_then_crash(state, path):
            (Path(path) / "__0_0.distcp").write_bytes(b"half a shard")
            raise OSError("killed mid-save (simulated)")

        monkeypatch.setattr(model_parallel, "_distributed_checkpoint_save", partly_then_crash)
        for name in ("last.ckpt", "step=20.ckpt"):
            with pytest.raises(OSError, match="simulated"):
                trainer.save_checkpoint(last.with_name(name))
        assert {p.name: p.read_bytes() for p in last.iterdir()} == before
        assert _listing(last.parent) == {"last.ckpt"}
    finally:  # or a later `lightning-vlm` subprocess would think it is rank 0's child and wait forever
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)


def _previous_export(folder: Path) -> None:
    import shutil

    from lightning_vlm.model.tiny import TinyVLM, ensure_tiny_vlm

    shutil.copytree(ensure_tiny_vlm(TinyVLM()), folder)


def test_export_that_fails_mid_replace_leaves_the_previous_export(tmp_path, monkeypatch):
    from transformers import AutoConfig

    from lightning_vlm import BackboneConfig, TinyVLM
    from lightning_vlm.objectives import SFT

    hf = tmp_path / "hf"
    _previous_export(hf)
    module = SFT(BackboneConfig(tiny=TinyVLM(num_layers=1)))
    module.configure_model()

    def crash_into_place(real):  # the new export is written; renaming it into place fails
        def move(src, dst, *args, **kwargs):
            if Path(dst) == hf and Path(src).name.startswith(".hf.") and "previous" not in Path(src).name:
                raise OSError("killed before the new export was renamed into place (simulated)")
            return real(src, dst, *args, **kwargs)

        return move

    monkeypatch.setattr(os, "replace", crash_into_place(os.replace))
    monkeypatch.setattr(os, "rename", crash_into_place(os.rename))
    trainer = SimpleNamespace(interrupted=False, is_global_zero=True)
    with pytest.raises(OSError, match="simulated"):
        ExportHF(str(hf)).on_fit_end(trainer, module)
    assert AutoConfig.from_pretrained(hf).text_config.num_hidden_layers == 2  # the previous export, readable
    assert _listing(tmp_path) == {"hf"}  # no partial export left


def test_next_start_puts_back_an_export_a_kill_left_aside(tmp_path):
    """A kill between moving the previous export aside and renaming the new one into place leaves both
    under temporary names; the next run's ExportHF restores the previous one and removes the partial one."""
    _previous_export(tmp_path / ".hf.previous")
    (tmp_path / ".hf.partial-123").mkdir()
    (tmp_path / ".hf.partial-123" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".other.previous").mkdir()  # not ours: left alone
    ExportHF(str(tmp_path / "hf")).setup(SimpleNamespace(is_global_zero=True), None, "fit")
    assert _listing(tmp_path) == {"hf", ".other.previous"}
    assert (tmp_path / "hf" / "config.json").is_file()


def test_fsdp_configs_name_the_atomic_strategy():
    from lightning_vlm.checkpoints import ModelParallelStrategy

    for path in (ROOT / "configs").glob("*fsdp*.yaml"):
        spec = yaml.safe_load(path.read_text())["trainer"]["strategy"]
        assert spec["class_path"] == f"{ModelParallelStrategy.__module__}.ModelParallelStrategy", path.name
