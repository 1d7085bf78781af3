"""schemathesis hooks for tests/schemathesis.sh.

The OpenAPI document states every bound of a submission that one field can carry. A few
rules relate several fields and are written in the fields' descriptions instead, since
JSON Schema cannot say them; the server answers 422 naming the field when they are
broken. Generated bodies that break them are dropped here, so that "schema-valid request
rejected" keeps meaning what it says. The limits come from the test server's
configuration (tests/schemathesis.sh exports them).
"""
import os

import schemathesis

MAX_EVAL_SECS = float(os.environ["CRUCIBLE_MAX_EVAL_SECS"])
DEFAULT_TIMEOUT = float(os.environ["CRUCIBLE_DEFAULT_TIMEOUT"])
MAX_CODE_BYTES = int(os.environ["CRUCIBLE_MAX_CODE_BYTES"])
# Each language's main file: no extra file may take its name.
MAIN_FILES = {
    "python": "main.py", "sh": "main.sh", "c": "main.c", "cpp": "main.cpp",
    "javascript": "main.js", "java": "Main.java", "go": "main.go", "rust": "main.rs",
}


def size(text):
    return len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else 0


def within_cross_field_rules(item):
    if not isinstance(item, dict):
        return True
    timeout = item.get("timeout")
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
        timeout = DEFAULT_TIMEOUT
    tests = item.get("tests")
    if isinstance(tests, list):
        total = 0.0
        for t in tests:
            own = t.get("timeout") if isinstance(t, dict) else None
            total += own if isinstance(own, (int, float)) and not isinstance(own, bool) else timeout
        if total > MAX_EVAL_SECS:  # `tests`: the timeouts add up to at most max_eval_secs
            return False
    files = item.get("files")
    if isinstance(files, list):
        names = [f.get("name") for f in files if isinstance(f, dict)]
        if len(set(map(str, names))) != len(names):  # `files`: no two alike
            return False
        for n in names:  # nor one inside another (`a` beside `a/b`)
            if any(isinstance(o, str) and isinstance(n, str) and o.startswith(n + "/") for o in names):
                return False
        language = item.get("language") or "python"
        if MAIN_FILES.get(language) in names:  # not the main file's name
            return False
        contents = sum(size(f.get("content")) for f in files if isinstance(f, dict))
        if contents + size(item.get("code")) > MAX_CODE_BYTES:  # together within max_code_bytes
            return False
    return True


@schemathesis.hook
def filter_body(context, body):
    if isinstance(body, dict) and isinstance(body.get("evaluations"), list):
        return all(within_cross_field_rules(i) for i in body["evaluations"])
    return within_cross_field_rules(body)
