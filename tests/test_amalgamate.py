"""src/hadaemon/ is the source, hadaemon.py is made from it: the tool, its refusals, the
package's shape (modules with one job, small, in layers with no cycles)."""

import ast
import importlib
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from conftest import HADAEMON, ROOT

sys.path.insert(0, str(ROOT / "tools"))
import amalgamate  # noqa: E402

PACKAGE = ROOT / "src" / "hadaemon"
MODULES = sorted(p for p in PACKAGE.glob("*.py") if p.name != "__init__.py")


def test_hadaemon_py_is_what_the_modules_make():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "amalgamate.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_check_exits_1_on_a_stale_file(tmp_path):
    stale = tmp_path / "hadaemon.py"
    stale.write_text(HADAEMON.read_text().replace("def parse_duration(", "def parse_duration_(", 1))
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "amalgamate.py"), "--check",
                             "--output", str(stale)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "is not what src/hadaemon/ makes" in result.stderr and "parse_duration_" in result.stderr


def test_every_module_is_in_the_shipped_file_under_its_banner():
    text = HADAEMON.read_text()
    order = [text.find("# %s.py: " % m) for m in amalgamate.ORDER]
    assert -1 not in order and order == sorted(order)
    assert len(amalgamate.ORDER) == len(MODULES) >= 15


def test_the_shipped_docstring_maps_every_module():
    doc = ast.get_docstring(ast.parse(HADAEMON.read_text()))
    for path in MODULES:
        first = ast.get_docstring(ast.parse(path.read_text())).split("\n\n")[0].split()[0]
        assert "%s.py" % path.stem in doc and first in doc, path.name


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_a_module_is_small_and_says_what_it_owns_and_uses(path):
    text = path.read_text()
    tree = ast.parse(text)
    doc = ast.get_docstring(tree)
    assert doc and any(line.startswith("Uses: ") for line in doc.splitlines()), path.name
    assert len(text.splitlines()) <= 600, "%s: %d lines" % (path.name, len(text.splitlines()))
    for node in ast.walk(tree):
        size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
        if isinstance(node, ast.ClassDef):
            assert size <= 400, "%s: class %s is %d lines" % (path.name, node.name, size)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert size <= 80, "%s: %s() is %d lines" % (path.name, node.name, size)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_a_module_imports_alone(path):
    """Each module imports by itself, in a fresh interpreter (no cycle, nothing missing)."""
    result = subprocess.run([sys.executable, "-c", "import hadaemon.%s" % path.stem],
                            cwd=str(ROOT / "src"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_no_undefined_or_unused_names_in_the_package():
    pyflakes = pytest.importorskip("pyflakes.api")
    from pyflakes import reporter
    import io
    out = io.StringIO()
    count = sum(pyflakes.checkPath(str(p), reporter.Reporter(out, out)) for p in MODULES)
    assert count == 0, out.getvalue()


# -- the refusals: a package of a few modules in a temp dir -------------------------------

INIT = '"""A package.\n\n%s\n"""\n' % amalgamate.MAP_PLACEHOLDER


def make_package(tmp_path, modules):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text(INIT)
    for name, text in modules.items():
        (package / (name + ".py")).write_text(text)
    return str(package)


def build(tmp_path, modules, order=None):
    package = make_package(tmp_path, modules)
    return amalgamate.amalgamate(amalgamate.load_modules(package, order or list(modules)), package)


A = '''\
"""The first.

Uses: the standard library only.
"""
import os

LIMIT = 3


def here():
    return os.getcwd()
'''

B = '''\
"""The second.

Uses: a.
"""
import os

from .a import LIMIT


class Twice:
    size = LIMIT * 2
'''


def test_two_modules_make_a_file_that_runs(tmp_path):
    text = build(tmp_path, {"a": A, "b": B})
    assert "from .a import" not in text and text.count("import os") == 1
    assert "# a.py: The first." in text and "# b.py: The second." in text
    assert "a.py  The first." in text                   # the map in the docstring
    namespace = {"__name__": "amalgam"}
    exec(compile(text, "amalgam.py", "exec"), namespace)
    assert namespace["Twice"].size == 6


@pytest.mark.parametrize("modules,order,message", [
    ({"a": A, "b": B}, ["b", "a"], "b.py: imports from .a, which comes after it in ORDER"),
    ({"a": A, "b": B}, ["a"], "b.py is not in tools/amalgamate.py's ORDER"),
    ({"a": A}, ["a", "b"], "ORDER names b, but"),
    ({"a": A, "b": B.replace("Uses: a.", "Uses: the standard library only.")}, None,
     "its docstring says 'Uses: the standard library only.', its imports say a"),
    ({"a": A, "b": B.replace("from .a import LIMIT", "from .a import LIMIT, MISSING")}, None,
     "imports MISSING from .a, which does not define it"),
    ({"a": A, "b": B.replace("class Twice", "def here():\n    pass\n\n\nclass Twice")}, None,
     "here is defined in"),
    ({"a": A.replace("LIMIT = 3", "LIMIT = LATER\nLATER = 3")}, None,
     "LATER is used at import time before hadaemon.py defines it"),
    ({"a": A + "\n\nclass Later:\n    x = 1\n    y = x + LATER\n\n\nLATER = 2\n"}, None,
     "LATER is used at import time before hadaemon.py defines it"),
    ({"a": A.replace("import os", "import os\nimport requests")}, None,
     "requests is not in the standard library"),
    ({"a": A.replace("import os", "import os\nimport hadaemon.cron")}, None,
     "import the package's names with from .module import name"),
    ({"a": A, "b": B.replace("from .a import LIMIT", "from . import a\nLIMIT = a.LIMIT")}, None,
     "import names from a module"),
    ({"a": A + "\n\ndef grow():\n    global LIMIT\n    LIMIT += 1\n", "b": B}, None,
     "imports LIMIT, which src"),
    ({"a": A.replace('"""The first.', '"""The first.\n\nNo uses line.').replace("Uses: the standard library only.\n", "")},
     None, "has no line 'Uses: ...'"),
])
def test_refuses(tmp_path, modules, order, message):
    with pytest.raises(amalgamate.Refused) as refused:
        build(tmp_path, modules, order)
    text = str(refused.value).replace(str(tmp_path) + os.sep + "pkg" + os.sep, "src" + os.sep)
    assert message in text, text


def test_a_function_body_may_use_what_comes_later(tmp_path):
    """Only import time counts: a function runs after the whole file is read."""
    text = build(tmp_path, {"a": A + "\n\ndef later():\n    return LATER\n\n\nLATER = 1\n"})
    namespace = {"__name__": "amalgam"}
    exec(compile(text, "amalgam.py", "exec"), namespace)
    assert namespace["later"]() == 1


def test_the_package_and_the_file_are_the_same_code():
    """A name the file defines is the package's, module by module (spot checks)."""
    shipped = importlib.import_module("conftest").load_shipped()
    import hadaemon.cron
    import hadaemon.ledger
    assert shipped.CronSpec.__doc__ == hadaemon.cron.CronSpec.__doc__
    assert shipped.RUN_EDGES == hadaemon.ledger.RUN_EDGES
    assert shutil.which("true") and shipped.parse_duration("1m") == 60


def test_a_class_body_reads_its_own_names_as_it_goes(tmp_path):
    text = build(tmp_path, {"a": A + "\n\nclass K:\n    x = LIMIT\n\n    def f(self):\n"
                                 "        return 0\n\n    y = x + 1\n    g = f\n"})
    namespace = {"__name__": "amalgam"}
    exec(compile(text, "amalgam.py", "exec"), namespace)
    assert namespace["K"].y == 4
