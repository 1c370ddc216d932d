"""The wildcard paths of `ckptd download` (SPEC §7), matched against a stored file's `rank-N/relpath`.

Pure: no I/O. The syntax is checked by daemon/config/artifacts.py (at load, exit 2); here a
checked pattern is parsed, `latest` is replaced, and stored files are matched.

Semantics (the reference says only "`*` matches an arbitrary number of chars, `?` one"):

- The first segment names rank folders (`rank-0`, `rank-*`, `*`); its `*` and `?` stay inside it,
  so `rank-*` never reaches into a checkpoint's name.
- After it, `*` matches any run of characters, '/' included, as the reference's words and fnmatch
  say: `rank-0/*.safetensors` is every .safetensors file of rank 0 at any depth. `?` matches one
  character other than '/'. Nothing else is special: `[` and `]` are themselves.
- A trailing '/' means the folder and everything below it. A pattern of one segment (`rank-1`,
  `*`) names whole rank folders, as if it ended with '/'.
- `latest` as the checkpoint segment of a folder pattern (`rank-*/latest/`, `rank-0/latest/x.json`)
  stands for the job's latest committed checkpoint (browse.latest), even if a folder is literally
  named `latest`. Without a '/' after it (`rank-0/latest`) it is a file name: DeepSpeed keeps a
  file `latest` at the top of its checkpoint folder.

Matching is the classic greedy glob with backtracking to the last `*`: O(len(pattern) × len(key))
at worst, whatever the pattern; a regex of many `.*` could take exponential time on a long key.
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon.config.artifacts import check_pattern

__all__ = ["LATEST", "Pattern", "check_pattern", "glob_match", "parse"]

LATEST = "latest"


@dataclass(frozen=True)
class Pattern:
    text: str  # as the user wrote it
    rank: str  # glob of the rank folder's name
    path: str  # glob of the path inside the rank folder ('' with folder: everything)
    folder: bool  # the path names a folder: everything below it matches

    @property
    def uses_latest(self) -> bool:
        """Whether the checkpoint segment is `latest` standing for the latest committed checkpoint."""
        head, sep, _ = self.path.partition("/")
        return head == LATEST and (bool(sep) or self.folder)

    def with_latest(self, checkpoint: str) -> Pattern:
        """This pattern with `latest` replaced by the name of the latest checkpoint (matched literally)."""
        if not self.uses_latest:
            return self
        _, sep, rest = self.path.partition("/")
        return Pattern(self.text, self.rank, _literal(checkpoint) + sep + rest, self.folder)

    def matches(self, rank: int, relpath: str) -> bool:
        """Whether the stored file `rank-{rank}/{relpath}` is selected."""
        if not glob_match(self.rank, f"rank-{rank}"):
            return False
        if not self.folder:
            return glob_match(self.path, relpath)
        if not self.path:
            return True
        # Some folder holding the file matches: every '/' of relpath ends a candidate folder.
        return any(relpath[i] == "/" and glob_match(self.path, relpath[:i]) for i in range(len(relpath)))


def parse(text: str) -> Pattern:
    """A checked pattern (ValueError saying why it is malformed; see artifacts.check_pattern)."""
    check_pattern(text)
    rank, _, path = text.partition("/")
    folder = path == "" or path.endswith("/")
    return Pattern(text, rank, path.removesuffix("/"), folder)


def _literal(name: str) -> str:
    # A checkpoint name with '*' or '?' in it must match only itself. No escape exists in this
    # syntax, so such characters become '?' that matches exactly them: see glob_match's ESCAPE.
    return "".join(ESCAPE + c if c in "*?" + ESCAPE else c for c in name)


ESCAPE = "\0"  # never in a checked pattern (control character): marks the next character as literal


def glob_match(pattern: str, text: str) -> bool:
    """Whether `text` matches `pattern` whole: `*` any run (also of '/'), `?` one character but '/'.

    | pattern        | text                      | match |
    |----------------|---------------------------|-------|
    | rank-*         | rank-12                   | yes   |
    | checkpoint-1?  | checkpoint-10             | yes   |
    | checkpoint-1?  | checkpoint-100            | no    |
    | a?b            | a/b                       | no    |
    | *.json         | sub/x.json                | yes   |
    | a*b*c          | aXbYbZc                   | yes   |
    """
    p = t = 0
    star_p, star_t = -1, 0
    while t < len(text):
        if p < len(pattern) and pattern[p] == ESCAPE:
            if p + 1 < len(pattern) and pattern[p + 1] == text[t]:
                p, t = p + 2, t + 1
                continue
        elif p < len(pattern) and pattern[p] == "*":
            star_p, star_t = p, t
            p += 1
            continue
        elif p < len(pattern) and (pattern[p] == text[t] or (pattern[p] == "?" and text[t] != "/")):
            p, t = p + 1, t + 1
            continue
        if star_p < 0:
            return False
        star_t += 1  # let the last '*' swallow one more character and retry from there
        p, t = star_p + 1, star_t
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)
