"""
The documentation keeps its promises. Every repository file that a .py or .md file names
exists; every "docs/method.md §k" names a section that docs/method.md has; nothing cites the
team's private notes or tracker numbers (users cannot open them); every Python line fits in
100 columns; the README's file table lists every script with a code-line budget that holds,
and the six lesson files stay within 1,200 code lines in all.

Which names count as citations of repository files: a bare file name ending in .py or .md
(resolved at the repository root or beside the citing file), and any path under docs/ or
tests/. A path under another folder (say, a file of the official mmMamba code) is some other
project's and is not checked. In .py files only comments and docstrings are read for file
names: string literals in code are often file names a program writes, not citations.
"""
import ast
import io
import os
import re
import subprocess
import tokenize

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD = "docs/method.md"
LESSON = ["data.py", "mmmamba.py", "scan_kernel.py", "seed.py", "distill.py", "sample.py"]
LESSON_TOTAL = 1200
MAX_COLUMNS = 100

# a repository file named in prose: docs/... or tests/... with an extension, or a bare name
# ending in .py or .md; not the tail of some other path and not after a format field
CITATION = re.compile(r"(?<![\w./{}-])"
                      r"((?:docs|tests)/[\w./-]*[\w-]\.(?:py|md|png|csv|json|txt|log)"
                      r"|[\w-]+\.(?:py|md))(?![\w/-])")
# after "docs/method.md": "§4", "§2/§3", "§§4-5", "§1, §2", "§1 and §2"
SECTION_RUN = re.compile(r"(?:\s*(?:,|/|;|&|and|or)?\s*§+\s*\d+(?:\s*[-–]\s*§?\s*\d+)?)+")
SECTION = re.compile(r"§+\s*(\d+)(?:\s*[-–]\s*§?\s*(\d+))?")
SCRIPT_RUN = re.compile(r"\bpython3?\s+(?:-\S+\s+)*([\w./-]+\.py)\b")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
# built from parts so that this file does not cite them itself
PRIVATE_NOTES = [name + ".md" for name in ("PAPER", "ANCHORS", "HOVLE", "METHOD", "teacher_study")]
TRACKER = re.compile(r"\bissues?\s*#\s*\d+", re.IGNORECASE)
# what arXiv 2502.13145 (v2) has: Sec. 3 is the preliminary (Eqs. 1-2), Sec. 4 the method
# (4.1 seeding, 4.2-4.4 the stages, Eqs. 3-5, 4.5 the architectures), Sec. 5 the experiments
# (5.1 settings, 5.2 Table 1, 5.3 efficiency: Fig. 1, Table 2, 5.4 ablations: Tables 3-6)
PAPER = "2502.13145"
PAPER_HAS = {"Sec": {"1", "2", "3", "4", "4.1", "4.2", "4.3", "4.4", "4.5", "5", "5.1", "5.2",
                     "5.3", "5.4", "6"},
             "Eq": {str(i) for i in range(1, 6)}, "Table": {str(i) for i in range(1, 7)},
             "Fig": {"1", "2", "3"}}
PAPER_REF = re.compile(r"\b(Sec|Eq|Table|Fig)[a-z]*\.?\s*(\d+(?:\.\d+)?)"
                       r"(?:\s*[-–]\s*(\d+(?:\.\d+)?))?")


# -----------------------------------------------------------------------------
# reading the repository


def repo_files(*exts):
    """Paths (relative to the root) of the repository's own files: what git tracks or would
    track (ignored outputs and the virtual environment left out); a plain walk without git."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        paths = [p for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        paths = []
        for top, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__", "out", "runs", "bench_out"))]
            paths += [os.path.relpath(os.path.join(top, n), ROOT) for n in names]
    return sorted(p for p in paths if p.endswith(exts) and os.path.isfile(os.path.join(ROOT, p)))


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def docstring_lines(tree):
    """Line numbers of the module, class and function docstrings of a parsed file."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def prose(path):
    """(line number, text) of what a person reads as a reference: a .py file's comments and
    docstrings; a .md file's text, and in its code blocks the scripts that `python` runs (the
    other names there are often files that a command writes)."""
    src = read(path)
    lines = src.splitlines()
    if not path.endswith(".py"):
        out, in_code = [], False
        for n, line in enumerate(lines, 1):
            if line.lstrip().startswith("```"):
                in_code = not in_code
            elif in_code:
                out.append((n, " ".join(SCRIPT_RUN.findall(line))))
            else:
                out.append((n, line))
        return out
    try:
        keep = {n: lines[n - 1] for n in docstring_lines(ast.parse(src))}
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                keep[tok.start[0]] = tok.string
    except (SyntaxError, tokenize.TokenError):   # newer syntax than this Python's: read it all
        return list(enumerate(lines, 1))
    return sorted(keep.items())


def code_lines(src):
    """Code lines of Python source: not blank, not only a comment, not part of a docstring.
    A statement over several lines counts each of its lines."""
    counted = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type not in skip:
            counted.update(range(tok.start[0], tok.end[0] + 1))
    return len(counted - docstring_lines(ast.parse(src)))


def citations(text):
    return [m.group(1) for m in CITATION.finditer(text)]


def method_sections_cited(text):
    """Section numbers cited as docs/method.md §k in a text, ranges expanded."""
    found = []
    for m in re.finditer(re.escape(METHOD), text):
        run = SECTION_RUN.match(text, m.end())
        for lo, hi in SECTION.findall(run.group(0) if run else ""):
            found += range(int(lo), int(hi or lo) + 1)
    return found


def paper_refs_cited(text):
    """("Sec", "3.2")-style pairs cited right after "2502.13145", up to the next ; or )."""
    found = []
    for m in re.finditer(re.escape(PAPER), text):
        tail = re.split(r"[;)\n]", text[m.end():m.end() + 80])[0]
        for kind, lo, hi in PAPER_REF.findall(tail):
            found.append((kind, lo))
            if hi and "." not in lo:
                found += [(kind, str(k)) for k in range(int(lo) + 1, int(hi) + 1)]
            elif hi:
                found.append((kind, hi))
    return found


def method_sections():
    return [int(n) for n in re.findall(r"^## §(\d+)\b", read(METHOD), re.MULTILINE)]


def exists(name, citing):
    """A cited name resolves at the repository root or beside the file that cites it. A name
    in capitals that resolves nowhere is a placeholder, as in "python X.py" or "FILE.md"."""
    if re.fullmatch(r"[A-Z]+\.(py|md)", os.path.basename(name)) and "/" not in name:
        return True
    return any(os.path.exists(os.path.join(ROOT, base, name))
               for base in ("", os.path.dirname(citing)))


def readme_file_table():
    """Rows of the README's "## Files" table that name a .py file: (file, part, budget)."""
    text = read("README.md")
    start = text.index("\n## Files")
    end = text.find("\n## ", start + 1)
    rows = []
    for line in text[start:end if end > 0 else None].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = re.fullmatch(r"`([\w/.-]+\.py)`", cells[0]) if line.startswith("|") else None
        if name:
            rows.append((name.group(1), cells[1], int(cells[-1])))
    return rows


# -----------------------------------------------------------------------------
# the helpers above, on texts where the answer is known


def test_citation_finder():
    text = ("see docs/method.md §2/§3 and tests/test_seed.py; seed.py, README.md. Not "
            "hustvl/mmMamba/convert_weight.py, not f'{name}.py', not torch.nn.functional")
    assert citations(text) == ["docs/method.md", "tests/test_seed.py", "seed.py", "README.md"]
    assert SCRIPT_RUN.findall("$ python -u docs/x/y.py --a b > out.py; python3 z.py") == [
        "docs/x/y.py", "z.py"]
    assert exists("X.py", "README.md") and not exists("nothere.py", "README.md")
    assert method_sections_cited(text) == [2, 3]
    assert method_sections_cited("(arXiv 2502.13145 Sec. 4.1; docs/method.md §4)") == [4]
    assert method_sections_cited("docs/method.md §§5-7, and docs/method.md") == [5, 6, 7]
    assert method_sections_cited("docs/method.md §1, §9 and 3 more") == [1, 9]
    assert paper_refs_cited("(arXiv 2502.13145 Sec. 4.2-4.4, Eq. 3, Tables 3-5; x Sec. 9)") == [
        ("Sec", "4.2"), ("Sec", "4.4"), ("Eq", "3"), ("Table", "3"), ("Table", "4"), ("Table", "5")]


def test_code_line_counter():
    src = ('"""Module docstring,\nover two lines."""\n'
           "import os  # a comment after code counts\n"
           "\n"
           "# a comment alone does not\n"
           "def f(a,\n"
           "      b):\n"
           "    '''docstring'''\n"
           "    s = '''a string\n"
           "that is not a docstring'''\n"
           "    return s\n")
    assert code_lines(src) == 6          # import, def (2 lines), s = (2 lines), return


# -----------------------------------------------------------------------------
# the repository


def test_cited_files_exist():
    missing = [f"{path}:{n}: {name}" for path in repo_files(".py", ".md")
               for n, text in prose(path) for name in citations(text)
               if not exists(name, path)]
    assert not missing, "files cited but not in the repository:\n" + "\n".join(missing)


def test_markdown_links_resolve():
    broken = []
    for path in repo_files(".md"):
        for n, line in enumerate(read(path).splitlines(), 1):
            for target in MD_LINK.findall(line):
                target = target.split("#")[0]
                if target and not re.match(r"[a-z]+:", target):
                    if not os.path.exists(os.path.join(ROOT, os.path.dirname(path), target)):
                        broken.append(f"{path}:{n}: {target}")
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_method_has_its_nine_sections():
    # the sections are fixed: code all over the repository cites them by number
    assert method_sections() == list(range(1, 10))


def test_method_sections_cited_exist():
    sections = set(method_sections())
    wrong = []
    for path in repo_files(".py", ".md"):
        for n, line in enumerate(read(path).splitlines(), 1):
            wrong += [f"{path}:{n}: §{k}" for k in method_sections_cited(line)
                      if k not in sections]
    # inside docs/method.md a bare "§k" cites the page itself
    for n, line in enumerate(read(METHOD).splitlines(), 1):
        wrong += [f"{METHOD}:{n}: §{k}" for lo, hi in SECTION.findall(line)
                  for k in range(int(lo), int(hi or lo) + 1) if k not in sections]
    assert not wrong, f"sections {METHOD} does not have:\n" + "\n".join(wrong)


def test_paper_citations_exist():
    wrong = []
    for path in repo_files(".py", ".md"):
        for n, line in enumerate(read(path).splitlines(), 1):
            wrong += [f"{path}:{n}: {kind}. {num}" for kind, num in paper_refs_cited(line)
                      if num not in PAPER_HAS[kind]]
    assert not wrong, f"arXiv {PAPER} (v2) has no such section, equation, table or figure:\n" + (
        "\n".join(wrong))


def test_no_private_notes_or_tracker_numbers():
    found = []
    for path in repo_files(".py", ".md"):
        for n, line in enumerate(read(path).splitlines(), 1):
            found += [f"{path}:{n}: {note}" for note in PRIVATE_NOTES if note in line]
            found += [f"{path}:{n}: {m.group(0)}" for m in TRACKER.finditer(line)]
    assert not found, ("cited but not readable by users (say it in your own words, or cite "
                       f"{METHOD} / the paper):\n" + "\n".join(found))


def test_python_lines_fit():
    long = [f"{path}:{n}: {len(line)} characters" for path in repo_files(".py")
            for n, line in enumerate(read(path).splitlines(), 1) if len(line) > MAX_COLUMNS]
    assert not long, f"lines over {MAX_COLUMNS} characters:\n" + "\n".join(long)


def test_markdown_prose_fits():
    # table rows (some are written by programs) and code blocks may be wider
    long = []
    for path in repo_files(".md"):
        in_code = False
        for n, line in enumerate(read(path).splitlines(), 1):
            if line.lstrip().startswith("```"):
                in_code = not in_code
            elif not in_code and not line.startswith("|") and len(line) > MAX_COLUMNS:
                long.append(f"{path}:{n}: {len(line)} characters")
    assert not long, f"lines over {MAX_COLUMNS} characters:\n" + "\n".join(long)


def test_readme_file_table_is_complete():
    table = {name for name, _, _ in readme_file_table()}
    scripts = {p for p in repo_files(".py") if "/" not in p}
    assert table == scripts, (f"README file table misses {sorted(scripts - table)}, "
                              f"lists files that do not exist {sorted(table - scripts)}")


@pytest.mark.parametrize("name,part,budget", readme_file_table())
def test_readme_budget_holds(name, part, budget):
    assert os.path.isfile(os.path.join(ROOT, name)), f"the README's file table lists {name}"
    n = code_lines(read(name))
    assert n <= budget, f"{name} has {n} code lines, over its README budget of {budget}"


def test_lesson_path_fits():
    rows = [(name, budget) for name, part, budget in readme_file_table()
            if part.startswith("lesson")]
    assert [name for name, _ in rows] == LESSON, "the README's lesson files, in read order"
    assert sum(budget for _, budget in rows) <= LESSON_TOTAL
    total = sum(code_lines(read(name)) for name in LESSON)
    assert total <= LESSON_TOTAL, f"the lesson path has {total} code lines, over {LESSON_TOTAL}"


def test_readme_test_command_for_ci():
    # .ci/run executes the second line after this marker: it must be the pytest command
    lines = read("README.md").splitlines()
    i = lines.index("<!-- ci: the test command -->")
    assert lines[i + 1] == "```" and "pytest" in lines[i + 2]
