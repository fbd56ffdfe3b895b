"""Code that several files must carry (each method file is self-contained) sits between
`# --- shared: NAME ---` and `# --- end shared: NAME ---` and is kept byte-identical:

  plumbing     clip.py, nclip.py, xclip.py: everything after the method (common flags, towers, distributed
               helpers, training loop, checkpoints, logging); one block per file
  collectives  inside plumbing, and in ssl_losses.py: get_rank, get_world_size, all_reduce_with_grad
  clip-loss    clip.py, xclip.py: clip_loss, and inside it `gather` (also in ssl_losses.py)
  nclip        nclip.py, xclip.py: nCLIP's flags, head and loss, and inside it `sinkhorn` (also in ssl_losses.py)

Regions may nest. The master copy of a region is the first of FILES that has it; every other copy must be
identical, and this test prints the diff when one is not. The test also holds every project file to lines of
at most 120 characters.

    python tests/test_sync.py          # report drift
    python tests/test_sync.py --fix    # copy each master region over its copies
"""

import difflib
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ["clip.py", "nclip.py", "xclip.py", "ssl_losses.py"]
METHOD_FILES = FILES[:3]
START, END = re.compile(r"^# --- shared: (\S+) ---$"), re.compile(r"^# --- end shared: (\S+) ---$")
EXPECTED = {  # region -> the files that must carry it
    "plumbing": METHOD_FILES, "collectives": FILES, "clip-loss": ["clip.py", "xclip.py"],
    "gather": ["clip.py", "xclip.py", "ssl_losses.py"], "nclip": ["nclip.py", "xclip.py"],
    "sinkhorn": ["nclip.py", "xclip.py", "ssl_losses.py"],
}
MAX_LINE = 120


def regions(text):
    """{name: (index of its first line, index of its end marker, [lines])} of the (possibly nested) shared
    regions in a file's text; a region that is opened twice or never closed is an error."""
    lines, out, open_ = text.splitlines(), {}, []
    for i, line in enumerate(lines):
        if START.match(line):
            name = START.match(line).group(1)
            if name in out or name in [n for n, _ in open_]:
                raise ValueError(f"region {name!r} appears twice")
            open_.append((name, i))
        elif END.match(line):
            name = END.match(line).group(1)
            if not open_ or open_[-1][0] != name:
                raise ValueError(f"line {i + 1}: end of region {name!r}, which is not the innermost open region")
            _, start = open_.pop()
            out[name] = (start + 1, i, lines[start + 1 : i])
    if open_:
        raise ValueError(f"region {open_[-1][0]!r} is never closed")
    return out


def read(root):
    return {f: open(os.path.join(root, f)).read() for f in FILES if os.path.exists(os.path.join(root, f))}


def check(root=ROOT):
    """-> list of human-readable problems (empty: in sync)."""
    texts = read(root)
    parsed = {f: regions(t) for f, t in texts.items()}
    problems, masters = [], {}
    for f in texts:
        for name, (_, _, lines) in parsed[f].items():
            masters.setdefault(name, (f, lines))
    for name, (master_file, master) in masters.items():
        for f in texts:
            if f != master_file and name in parsed[f] and parsed[f][name][2] != master:
                diff = difflib.unified_diff(master, parsed[f][name][2], master_file, f, lineterm="", n=1)
                problems.append(f"{f}: shared region {name!r} differs from {master_file}:\n" + "\n".join(diff))
    return problems


def fix(root=ROOT):
    """Overwrite every copy of a region with its master copy, one region at a time until nothing changes."""
    for _ in range(100):
        texts = read(root)
        masters = {}
        for f, t in texts.items():
            for name, (_, _, lines) in regions(t).items():
                masters.setdefault(name, lines)
        stale = [(f, name, start, end) for f, t in texts.items()
                 for name, (start, end, copy) in regions(t).items() if copy != masters[name]]
        if not stale:
            return
        f, name, start, end = stale[0]
        lines = texts[f].splitlines()
        lines[start:end] = masters[name]
        with open(os.path.join(root, f), "w") as out:
            out.write("\n".join(lines) + "\n")
        print(f"{f}: region {name!r} updated")


def project_files():
    files = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "tests", "*.py"))
    files += [os.path.join(ROOT, f) for f in ("README.md", "requirements.txt", ".ci/run")]
    return [f for f in files if os.path.exists(f)]


def test_shared_regions_are_in_sync():
    problems = check()
    assert not problems, "\n\n".join(problems)


def test_each_file_has_its_regions_and_one_plumbing_block_after_its_method():
    for f in FILES:
        text = open(os.path.join(ROOT, f)).read()
        found = regions(text)
        assert {name for name, files in EXPECTED.items() if f in files} == set(found), f
        if f in METHOD_FILES:
            lines = text.splitlines()
            start, end, _ = found["plumbing"]
            first = next(i for i, line in enumerate(lines) if re.match(r"(def|class) ", line))
            assert first < start, f"{f}: the method must come before the plumbing block"
            # after the block: only the entry point
            assert [line for line in lines[end + 1 :] if line.strip()] == [
                'if __name__ == "__main__":', "    main(parse_args())"], f


def test_drift_is_detected_and_fixed(tmp_path):
    texts = read(ROOT)
    for f, t in texts.items():
        (tmp_path / f).write_text(t)
    assert check(str(tmp_path)) == []
    lines = texts["xclip.py"].splitlines()
    start, _, _ = regions(texts["xclip.py"])["plumbing"]
    lines[start + 3] += "  # a changed line"
    sink, _, _ = regions(texts["xclip.py"])["sinkhorn"]
    del lines[sink + 2]  # a dropped line in a nested region: it and the region around it drift
    (tmp_path / "xclip.py").write_text("\n".join(lines) + "\n")
    problems = check(str(tmp_path))
    assert sorted(p.split(":")[1] for p in problems) == [" shared region 'nclip' differs from nclip.py",
                                                        " shared region 'plumbing' differs from clip.py",
                                                        " shared region 'sinkhorn' differs from nclip.py"], problems
    assert all(p.startswith("xclip.py") for p in problems) and "a changed line" in "".join(problems)
    fix(str(tmp_path))
    assert check(str(tmp_path)) == [] and (tmp_path / "xclip.py").read_text() == texts["xclip.py"]


def test_nested_regions_must_close_in_order():
    bad = "# --- shared: a ---\n# --- shared: b ---\n# --- end shared: a ---\n# --- end shared: b ---\n"
    try:
        regions(bad)
    except ValueError as e:
        assert "innermost" in str(e)
    else:
        raise AssertionError("crossed regions were accepted")


def test_no_project_line_is_longer_than_120_characters():
    long = [f"{os.path.relpath(f, ROOT)}:{i}: {len(line)} characters"
            for f in project_files() for i, line in enumerate(open(f).read().splitlines(), 1) if len(line) > MAX_LINE]
    assert not long, "\n".join(long)


if __name__ == "__main__":
    if "--fix" in sys.argv:
        fix()
    problems = check()
    print("\n\n".join(problems) if problems else "shared regions in sync")
    sys.exit(1 if problems else 0)
