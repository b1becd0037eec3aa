"""The docs tell the truth about the tree: the architecture page lists every module (and
only modules that exist), every relative link resolves, and no two modules import each
other (the dependency rule of docs/architecture.md)."""

import ast
import itertools
import re

from conftest import REPO

PACKAGE = REPO / "bpnet"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _layout_paths():
    """Paths named in the ``bpnet/`` block of docs/architecture.md's Layout section."""
    text = (REPO / "docs" / "architecture.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    stack, found, inside = [], set(), False
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        name = line.split()[0]
        if indent == 0:
            inside = name == "bpnet/"
            stack = [(0, "bpnet")]
            continue
        if not inside or not (name.endswith(".py") or name.endswith("/")):
            continue  # a wrapped description line
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "/".join([p for _, p in stack] + [name.rstrip("/")])
        found.add(path)
        if name.endswith("/"):
            stack.append((indent, name.rstrip("/")))
    return found


def test_architecture_page_lists_exactly_the_modules():
    listed = _layout_paths()
    modules = {str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py")}
    # A subpackage's __init__.py may go unlisted when the package itself is.
    unlisted = {m for m in modules - listed
                if not (m.endswith("/__init__.py") and m.rsplit("/", 1)[0] in listed)}
    assert not unlisted, f"modules missing from docs/architecture.md: {sorted(unlisted)}"
    ghosts = sorted(p for p in listed if not (REPO / p).exists())
    assert not ghosts, f"docs/architecture.md names files that do not exist: {ghosts}"


def _anchors(md: str):
    out = set()
    for heading in re.findall(r"^#+ (.+)$", md, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def test_every_relative_link_in_the_docs_resolves():
    bad = []
    for page in DOCS:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
                bad.append(f"{page.name}: {target} (no such heading)")
    assert not bad, "\n".join(bad)


def _module_name(path):
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path, name, modules):
    """bpnet modules imported anywhere in the file (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # "from . import x" imports the module x, not the package
                out.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_no_two_modules_import_each_other():
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    deps = {m: (_imports(p, m, files) & set(files)) - {m} for m, p in files.items()}
    mutual = [(a, b) for a, b in itertools.combinations(sorted(files), 2)
              if b in deps[a] and a in deps[b]]
    assert not mutual, f"modules that import each other: {mutual}"
