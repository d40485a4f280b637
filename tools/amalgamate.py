#!/usr/bin/env python3
"""Write hadaemon.py, the one file users run, from the modules in src/hadaemon/.

Like SQLite's mksqlite3c.tcl: the modules are pasted in the order ORDER declares, each
under a banner naming its source file, with the package's own imports removed (every
module then lives in one namespace) and the standard library's gathered at the top.
The file's docstring is the package's (src/hadaemon/__init__.py), with the map of the
modules made from the first line of each module's docstring.

It refuses, naming the file and line:
  - a module in src/hadaemon/ that ORDER does not list, or one ORDER lists that is not there;
  - a module that imports from one that comes after it in ORDER (a cycle, or a wrong order);
  - an import of the package in any other form than ``from .module import name``;
  - an import of something outside the standard library;
  - a top-level name defined in two modules (one namespace: the later would win);
  - a name used at import time before the file defines it (a class body, a default,
    a decorator, a module-level statement).

Usage:  python3 tools/amalgamate.py            write hadaemon.py
        python3 tools/amalgamate.py --check    exit 1 when hadaemon.py is not what the
                                               modules make (CI runs this first)
        python3 tools/amalgamate.py --output F write F instead
        python3 tools/amalgamate.py --map      the modules as a Markdown table
"""

import argparse
import ast
import builtins
import difflib
import os
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "src", "hadaemon")
TARGET = os.path.join(ROOT, "hadaemon.py")

# The modules in the order of the shipped file: each uses only those above it.
ORDER = [
    "base", "cron", "config", "netsettings", "configfiles", "wire", "records", "dumbfiles", "store",
    "proc", "children", "ssh", "ledger_store", "switchover", "ledger", "scheduler", "pool", "control",
    "checkflow",
    "http_proto", "http_views", "http_server",
    "etcd", "cluster_agent", "cluster_member", "cluster_ledger", "cluster_link",
    "actions", "reload", "notify_queue", "notify", "master", "whatif", "client", "opsclient", "checkcmd",
    "starter", "cli",
]

MAP_HEADING = "Modules (src/hadaemon/, in the order of hadaemon.py: each uses only those above it)"
MAP_PLACEHOLDER = "(made from each module's docstring by tools/amalgamate.py, into hadaemon.py)"
BANNER = "# " + "=" * 76
STDLIB = set(getattr(sys, "stdlib_module_names", ())) | {"__future__"}


class Refused(Exception):
    """The modules cannot be made into one file; the message says where and why."""


class Module:
    """One source file: its docstring, its imports and the rest, as the file has them."""

    def __init__(self, name, path):
        self.name, self.path = name, path
        with open(path, encoding="utf-8") as f:
            self.text = f.read()
        self.lines = self.text.splitlines()
        try:
            self.tree = ast.parse(self.text, path)
        except SyntaxError as exc:
            raise Refused("%s:%s: %s" % (self.rel, exc.lineno, exc.msg))
        self.doc = ast.get_docstring(self.tree, clean=True)
        if not self.doc:
            raise Refused("%s:1: a module opens with a docstring that says what it owns" % self.rel)
        self.std_imports = []       # source lines, as written
        self.uses = {}              # module -> [names]
        self.cut = set()            # line numbers (1-based) that do not go into the file
        self._read_top()

    @property
    def rel(self):
        rel = os.path.relpath(self.path, ROOT)
        return self.path if rel.startswith("..") else rel

    def _read_top(self):
        body = self.tree.body
        first = body[0]
        self.cut.update(range(first.lineno, first.end_lineno + 1))        # the docstring
        for node in body[1:]:
            if isinstance(node, ast.ImportFrom) and node.level:
                if node.level != 1 or not node.module:
                    raise Refused("%s:%s: import names from a module (from .base import x): "
                                  "in hadaemon.py there are no modules" % (self.rel, node.lineno))
                self.uses.setdefault(node.module, []).extend(a.name for a in node.names)
                if any(a.asname for a in node.names):
                    raise Refused("%s:%s: no 'as' in the package's imports: the file has one "
                                  "name for each thing" % (self.rel, node.lineno))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top == "hadaemon":
                        raise Refused("%s:%s: import the package's names with from .module "
                                      "import name" % (self.rel, node.lineno))
                    if STDLIB and top not in STDLIB:
                        raise Refused("%s:%s: %s is not in the standard library" % (
                            self.rel, node.lineno, name))
                self.std_imports.append(ast.get_source_segment(self.text, node))
            else:
                continue
            self.cut.update(range(node.lineno, node.end_lineno + 1))

    def defined(self):
        """{name: line} of what the module defines at its top level."""
        return defined_names(self.tree.body)

    def body(self):
        """The module's code as it goes into the file: no docstring, no imports."""
        kept = [line for n, line in enumerate(self.lines, 1) if n not in self.cut]
        out = []
        for line in kept:                   # runs of blank lines left by the cut: two at most
            if not line.strip() and len(out) >= 2 and not out[-1].strip() and not out[-2].strip():
                continue
            out.append(line)
        while out and not out[0].strip():
            out.pop(0)
        while out and not out[-1].strip():
            out.pop()
        return out


def defined_names(statements, imports=False):
    """{name: line} of what these top-level statements define (and import, if asked)."""
    names = {}
    for node in statements:
        targets = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            targets = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                targets += [n.id for n in ast.walk(target) if isinstance(n, ast.Name)]
        elif imports and isinstance(node, (ast.Import, ast.ImportFrom)):
            targets = [(a.asname or a.name).split(".")[0] for a in node.names]
        for name in targets:
            names.setdefault(name, node.lineno)
    return names


def load_modules(package=PACKAGE, order=ORDER):
    present = sorted(f[:-3] for f in os.listdir(package)
                     if f.endswith(".py") and f != "__init__.py")
    unlisted = [m for m in present if m not in order]
    if unlisted:
        raise Refused("%s.py is not in tools/amalgamate.py's ORDER: add it where the modules "
                      "it uses are above it" % os.path.join(package, unlisted[0]))
    missing = [m for m in order if m not in present]
    if missing:
        raise Refused("ORDER names %s, but %s.py does not exist" % (
            missing[0], os.path.join(package, missing[0])))
    return [Module(name, os.path.join(package, name + ".py")) for name in order]


def check_imports(modules):
    """Each module uses only modules above it, and only names they define."""
    place = {m.name: i for i, m in enumerate(modules)}
    by_name = {m.name: m for m in modules}
    for m in modules:
        for used, names in m.uses.items():
            if used not in place:
                raise Refused("%s: imports from .%s, which is not a module of the package" % (m.rel, used))
            if place[used] >= place[m.name]:
                raise Refused("%s: imports from .%s, which comes after it in ORDER (each module "
                              "uses only those above it: move what it needs, or reorder)" % (m.rel, used))
            defined = by_name[used].defined()
            for name in names:
                if name not in defined:
                    raise Refused("%s: imports %s from .%s, which does not define it" % (m.rel, name, used))


def check_uses_line(modules):
    """A module's docstring says what it uses ("Uses: base, wire."): the imports agree."""
    for m in modules:
        said = [" ".join(p.split()) for p in m.doc.split("\n\n") if p.startswith("Uses:")]
        if not said:
            raise Refused("%s:1: its docstring has no line 'Uses: ...' naming the modules it "
                          "imports from" % m.rel)
        words = said[-1][len("Uses:"):].strip().rstrip(".")
        named = [] if words == "the standard library only" else [w.strip() for w in words.split(",")]
        real = [other.name for other in modules if other.name in m.uses]
        if named != real:
            raise Refused("%s:1: its docstring says 'Uses: %s.', its imports say %s" % (
                m.rel, words, ", ".join(real) or "the standard library only"))


def check_rebound(modules):
    """No module imports a name another rebinds with ``global``: in the package the
    importer would keep the old value (in hadaemon.py, one namespace, it would not)."""
    rebound = {}
    for m in modules:
        for node in ast.walk(m.tree):
            if isinstance(node, ast.Global):
                for name in node.names:
                    rebound[name] = (m, node.lineno)
    for m in modules:
        for used, names in m.uses.items():
            for name in names:
                if name in rebound and rebound[name][0].name == used:
                    owner, line = rebound[name]
                    raise Refused("%s: imports %s, which %s:%s rebinds: the package would see "
                                  "a stale copy (ask %s for it through a function)" % (
                                      m.rel, name, owner.rel, line, owner.name))


def check_collisions(modules):
    """No top-level name defined in two modules: in one file the later would win."""
    owner = {}
    for m in modules:
        for name, line in m.defined().items():
            if name in owner:
                first, first_line = owner[name]
                raise Refused("%s:%s: %s is defined in %s:%s too: in hadaemon.py they would be one "
                              "name (rename one)" % (m.rel, line, name, first.rel, first_line))
            owner[name] = (m, line)


class _ImportTime(ast.NodeVisitor):
    """The names a top-level statement reads while the file is imported (not in bodies
    of functions, which run later): class bodies, bases, decorators, defaults, annotations."""

    def __init__(self):
        self.loads = []

    def visit_Name(self, node):
        if isinstance(node.ctx, ast.Load):
            self.loads.append(node)

    def _function(self, node):
        for d in node.decorator_list:
            self.visit(d)
        args = node.args
        for default in args.defaults + [d for d in args.kw_defaults if d is not None]:
            self.visit(default)
        for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
            if a is not None and a.annotation is not None:
                self.visit(a.annotation)
        if node.returns is not None:
            self.visit(node.returns)

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_ClassDef(self, node):
        for part in node.decorator_list + node.bases + [k.value for k in node.keywords]:
            self.visit(part)
        local = set()
        for stmt in node.body:          # a class body reads its own names as it goes
            inner = _ImportTime()
            inner.visit(stmt)
            self.loads += [n for n in inner.loads if n.id not in local]
            local.update(defined_names([stmt]))

    def visit_Lambda(self, node):
        for default in node.args.defaults:
            self.visit(default)

    def _comprehension(self, node):
        # only the first iterable is read in the enclosing scope; the rest is the
        # comprehension's own (its targets would read as undefined here)
        self.visit(node.generators[0].iter)

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _comprehension


def check_import_time(modules):
    """Every name read at import time is defined above it in the file, or a builtin."""
    known = set(dir(builtins)) | {"__name__", "__file__", "__doc__"}
    for m in modules:
        for node in m.tree.body[1:]:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                known.update(defined_names([node], imports=True))    # the package's: defined above already
                continue
            visitor = _ImportTime()
            visitor.visit(node)
            for name in visitor.loads:
                if name.id not in known:
                    raise Refused("%s:%s: %s is used at import time before hadaemon.py defines it "
                                  "(define it above, in this module or one above it)" % (
                                      m.rel, name.lineno, name.id))
            known.update(defined_names([node]))


def module_map(modules):
    """The docstring's map: each module's file and the first line of its docstring."""
    width = max(len(m.name) for m in modules) + 3 + 2
    rows = []
    for m in modules:
        summary = m.doc.split("\n\n")[0].replace("\n", " ")
        wrapped = textwrap.wrap(summary, 88 - width) or [""]
        rows.append((m.name + ".py").ljust(width) + wrapped[0])
        rows += [" " * width + more for more in wrapped[1:]]
    return rows


def markdown_map(modules):
    """The modules as a Markdown table, for docs/HACKING.md and notes."""
    rows = ["| module | lines | what it owns | uses |", "|---|---:|---|---|"]
    for m in modules:
        summary = m.doc.split("\n\n")[0].replace("\n", " ").replace("|", "\\|")
        uses = [other.name for other in modules if other.name in m.uses]
        rows.append("| %s.py | %d | %s | %s |" % (m.name, len(m.lines), summary, ", ".join(uses) or "-"))
    return rows


def package_doc(modules, package):
    path = os.path.join(package, "__init__.py")
    with open(path, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read(), path), clean=True)
    if MAP_PLACEHOLDER not in doc:
        raise Refused("%s: its docstring has no line %r where the map of the modules goes" % (
            path, MAP_PLACEHOLDER))
    return doc.replace(MAP_PLACEHOLDER, "\n".join(module_map(modules)))


def banner(m):
    paragraphs = m.doc.split("\n\n", 1)
    title = paragraphs[0].replace("\n", " ")
    out = [BANNER] + ["# " + line for line in textwrap.wrap("%s.py: %s" % (m.name, title), 76)] + [BANNER]
    if len(paragraphs) > 1:
        out.append("#")
        out += [("# " + line).rstrip() for line in paragraphs[1].splitlines()]
    return out


def amalgamate(modules, package=PACKAGE):
    """The text of hadaemon.py, or Refused."""
    check_imports(modules)
    check_uses_line(modules)
    check_rebound(modules)
    check_collisions(modules)
    check_import_time(modules)
    std = sorted(set(line for m in modules for line in m.std_imports),
                 key=lambda line: (line.startswith("from "), line.split()[1]))
    doc = package_doc(modules, package)
    out = ["#!/usr/bin/env python3", '"""' + doc + '\n"""', "",
           "# Made by tools/amalgamate.py from src/hadaemon/: change the modules, then run it.",
           "# Each part below names its source file, so a line here leads back to its module.",
           ""]
    out += std
    for m in modules:
        out += ["", ""] + banner(m) + [""] + m.body()
    out += ["", "", 'if __name__ == "__main__":', "    sys.exit(main())", ""]
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when hadaemon.py is stale")
    parser.add_argument("--output", default=TARGET, help="the file to write (default hadaemon.py)")
    parser.add_argument("--map", action="store_true",
                        help="print the modules as a Markdown table (module, lines, what it owns, uses)")
    args = parser.parse_args(argv)
    try:
        modules = load_modules()
        text = amalgamate(modules)
    except Refused as exc:
        print("amalgamate: %s" % exc, file=sys.stderr)
        return 1
    if args.map:
        print("\n".join(markdown_map(modules)))
        return 0
    if args.check:
        try:
            with open(args.output, encoding="utf-8") as f:
                current = f.read()
        except OSError as exc:
            current = ""
            print("amalgamate: %s" % exc, file=sys.stderr)
        if current == text:
            return 0
        diff = list(difflib.unified_diff(current.splitlines(), text.splitlines(),
                                         "hadaemon.py", "what src/hadaemon/ makes", lineterm="", n=1))
        print("amalgamate: %s is not what src/hadaemon/ makes (%d lines differ): run "
              "python3 tools/amalgamate.py and commit it" % (os.path.relpath(args.output), len(diff)),
              file=sys.stderr)
        print("\n".join(diff[:40]), file=sys.stderr)
        return 1
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
