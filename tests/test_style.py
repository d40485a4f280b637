"""hadaemon.py stays one Python 3.8 file of the standard library, documented at the top."""

import ast
import shutil
import subprocess
import sys

import pytest

from conftest import HADAEMON

SOURCE = HADAEMON.read_text(encoding="utf-8")


def test_parses_with_the_python_3_8_grammar():
    ast.parse(SOURCE, filename=str(HADAEMON), feature_version=(3, 8))


def test_the_3_8_grammar_check_has_teeth():
    with pytest.raises(SyntaxError):
        ast.parse("match x:\n    case 1:\n        pass\n", feature_version=(3, 8))
    with pytest.raises(SyntaxError):
        ast.parse("if (n := 1):\n    pass\n", feature_version=(3, 7))


def imported_modules(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                yield node.module.split(".")[0], node.lineno


def test_imports_only_the_standard_library():
    names = dict(imported_modules(ast.parse(SOURCE)))
    assert "json" in names and "selectors" in names    # the walk finds imports at all
    outside = {name: line for name, line in names.items() if name not in sys.stdlib_module_names}
    assert outside == {}, "not in the standard library: %s" % outside


def test_imports_nothing_newer_than_3_8():
    """Modules added to the standard library after 3.8 (the grammar check cannot see these)."""
    newer = {"zoneinfo", "graphlib", "tomllib", "wsgiref.types"}
    names = dict(imported_modules(ast.parse(SOURCE)))
    assert not newer & set(names)


def vermin_argv():
    found = shutil.which("vermin")
    if found:
        return [found]
    try:
        import vermin  # noqa: F401
    except ImportError:
        pytest.skip("vermin is not installed (pip install vermin)")
    return [sys.executable, "-c", "import sys; from vermin.main import main; sys.exit(main())"]


def run_vermin(path):
    # -t=3.8- : fail (exit 1) when anything needs more than 3.8; --violations lists only those
    return subprocess.run(vermin_argv() + ["--no-config-file", "--no-tips", "--violations", "-t=3.8-",
                                           "--eval-annotations", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_vermin_finds_nothing_that_needs_more_than_3_8():
    result = run_vermin(HADAEMON)
    assert result.returncode == 0, result.stdout + result.stderr


def test_vermin_check_has_teeth(tmp_path):
    newer = tmp_path / "newer.py"
    newer.write_text("import os\nprint('ab'.removeprefix('a'), os.waitstatus_to_exitcode(0))\n")
    result = run_vermin(newer)
    assert result.returncode != 0 and "removeprefix" in result.stdout, result.stdout + result.stderr


def test_module_docstring_carries_the_process_model_signals_files_and_exit_codes():
    doc = ast.get_docstring(ast.parse(SOURCE))
    assert doc, "hadaemon.py has no module docstring"
    for heading in ("Process model", "Signals", "Files", "Exit codes"):
        assert heading in doc, heading
    for word in ("SIGHUP", "SIGTERM", "SIGINT", "SIGCHLD", "hadaemon.pid", "hadaemon.sock",
                 "state.db", "hadaemon.log", "0 ok", "3 not running"):
        assert word in doc, word


def test_one_file_entry_point_last():
    """main() is defined last, and the file runs it only as a script."""
    tree = ast.parse(SOURCE)
    defs = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    assert defs[-1] == "main"
    last = tree.body[-1]
    assert isinstance(last, ast.If) and "__main__" in ast.unparse(last.test)


def test_no_bare_except():
    bare = [node.lineno for node in ast.walk(ast.parse(SOURCE))
            if isinstance(node, ast.ExceptHandler) and node.type is None]
    assert bare == []


def test_every_fork_child_ends_in_os_exit():
    """Each os.fork() site has an os._exit in the same function (the child never returns)."""
    tree = ast.parse(SOURCE)
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef):
            continue
        calls = {ast.unparse(node.func) for node in ast.walk(func) if isinstance(node, ast.Call)}
        if "os.fork" in calls:
            assert "os._exit" in calls, "%s forks without os._exit" % func.name
