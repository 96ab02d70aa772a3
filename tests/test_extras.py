"""The optional-extra gate: a skip with the install command for a user, a failure in CI."""

import sys
from pathlib import Path

import pytest

from extras import REQUIRE_ENV, require_extra, require_folder, with_extras


@pytest.fixture
def dali_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # importing it raises ImportError


def test_missing_extra_skips_with_the_install_command(dali_absent, monkeypatch):
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"pip install -e '\.\[dali\]'"):
        require_extra("dali")


def test_missing_extra_fails_where_extras_are_required(dali_absent, monkeypatch):
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=r"\[dali\] extra.*FASTFVAE_REQUIRE_EXTRAS=1"):
        require_extra("dali")


def test_present_extra_returns_its_module(monkeypatch):
    fake = type(sys)("nvidia.dali")
    monkeypatch.setitem(sys.modules, "nvidia.dali", fake)
    assert require_extra("dali") is fake


def test_unknown_extra_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown extra"):
        require_extra("tensorflow")


def test_with_extras_marks_only_the_values_that_need_one():
    params = with_extras(["device", "dali"], lambda kind: "dali" if kind == "dali" else None)
    assert [p.values for p in params] == [("device",), ("dali",)]
    assert not params[0].marks
    (mark,) = params[1].marks
    assert mark.name == "requires_extra" and mark.args == ("dali",)


pytest_plugins = ["pytester"]


def test_the_marker_gates_a_test_through_the_plugin_hook(pytester, monkeypatch):
    """End to end: a marked test under a missing extra is skipped, and under REQUIRE_ENV=1 fails."""
    pytester.makeconftest("import sys\nsys.modules['nvidia.dali'] = None\n")
    pytester.makepyfile("import pytest\n\n@pytest.mark.requires_extra('dali')\ndef test_x():\n    assert True\n")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent))
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    pytester.runpytest_subprocess("-p", "extras", "-p", "no:cacheprovider").assert_outcomes(skipped=1)
    monkeypatch.setenv(REQUIRE_ENV, "1")
    pytester.runpytest_subprocess("-p", "extras", "-p", "no:cacheprovider").assert_outcomes(errors=1)  # a setup failure: the run fails


def test_missing_data_folder_skips_for_a_user_and_fails_where_required(tmp_path, monkeypatch):
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    assert require_folder(tmp_path, "the data") == tmp_path
    with pytest.raises(pytest.skip.Exception, match=f"needs the data at {tmp_path / 'absent'}, which is absent"):
        require_folder(tmp_path / "absent", "the data")
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=f"absent here; {REQUIRE_ENV}=1 says it is present here"):
        require_folder(tmp_path / "absent", "the data")


def test_the_shared_dir_fixture_is_gated_like_an_extra(pytester, monkeypatch):
    """The suite's own conftest where no data is checked out beside the repository: the fixture's
    test is skipped with the reason, and fails under REQUIRE_ENV=1."""
    pytester.makeconftest((Path(__file__).resolve().parent / "conftest.py").read_text())
    pytester.makepyfile("def test_x(shared_dir):\n    assert shared_dir.is_dir()\n")
    assert not (pytester.path.parent / "shared").exists()
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent))
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*needs the calibration and parity data checked out beside the repository at*"])
    monkeypatch.setenv(REQUIRE_ENV, "1")
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(errors=1)
