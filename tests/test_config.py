"""hmmd's settings from a TOML file (--config, HMMD_CONFIG): named as the flags are,
overridden by HMMD_* variables and then by flags, checked as they are; anything
the file gets wrong is refused with a message naming the file and the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from hmm.admin import AdminClient
from hmm.process import ProcessClient
from hmmd.config import Config
from tests.procs import start_hmmd


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "hmmd.toml"
    path.write_text(text)
    return str(path)


def test_the_file_then_the_environment_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, 'ram = "1G"\ncallback-deadline-ms = 2000\nmigration_timeout_ms = 900\n'
                           'swap = 268435456\nlog-format = "json"\n')
    cfg = Config.from_env_and_args(["--config", path], env={})
    assert (cfg.ram_bytes, cfg.callback_deadline_ms, cfg.migration_timeout_ms) == (1 << 30, 2000, 900)
    assert cfg.swap_bytes == 256 << 20 and cfg.log_format == "json"  # (a size may be a number of bytes)
    assert cfg.listen == Config().listen  # not in the file: the embedded default
    env = {"HMMD_CONFIG": path, "HMMD_CALLBACK_DEADLINE_MS": "1500"}
    cfg = Config.from_env_and_args(["--migration-timeout-ms", "700"], env=env)
    assert (cfg.ram_bytes, cfg.callback_deadline_ms, cfg.migration_timeout_ms) == (1 << 30, 1500, 700)


@pytest.mark.parametrize(("text", "message"), [
    ("rams = \"1G\"\n", "unknown setting 'rams'"),
    ("callback-deadline-ms = \"fast\"\n", "callback-deadline-ms must be an integer"),
    ("keepalive_ms = true\n", "keepalive_ms must be an integer"),
    ("ram = true\n", "ram must be a string"),
    ("listen = [\"a\"]\n", "listen must be a string"),
    ("ram = \n", "Invalid value"),  # not TOML
    ("[ram]\nsize = 1\n", "ram must be a string"),
])
def test_a_file_that_gets_a_setting_wrong_is_refused(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ValueError) as e:
        Config.from_env_and_args(["--config", path], env={})
    assert path in str(e.value) and message in str(e.value)


def test_file_values_are_checked_as_flags_are(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--ram must be at least"):
        Config.from_env_and_args(["--config", write(tmp_path, 'ram = "16K"\n')], env={})
    with pytest.raises(ValueError, match="cannot read"):
        Config.from_env_and_args([], env={"HMMD_CONFIG": str(tmp_path / "none.toml")})
    with pytest.raises(ValueError, match="HMMD_KEEPALIVE_MS must be an integer, not 'soon'"):
        Config.from_env_and_args([], env={"HMMD_KEEPALIVE_MS": "soon"})


async def test_hmmd_runs_on_its_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'ram = "64M"\nhugetlb-pages = 3\n')
    prog = start_hmmd(tmp_path, "--config", path)
    cpu = ProcessClient.connect(prog.address)
    try:
        stats = await AdminClient(cpu.channel).stats()
        assert (stats.ram_frames, stats.hugetlb_pages) == ((64 << 20) // 4096, 3)
    finally:
        await cpu.close()
        assert prog.stop() == 0, prog.log_text()
