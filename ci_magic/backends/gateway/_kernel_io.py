"""ci-magic's file operations, run inside a gateway kernel (a gateway serves no file API).

This file is never imported by ci-magic: ``backend.py`` sends its source in an execute request,
run with ``exec`` in a fresh namespace holding ``ARGS`` (a JSON string), so nothing lands in the
user's variables. It may use only the standard library and IPython, on any Python 3.8+.

Every operation answers with one display message of type ``MIME``. The host trusts none of it:
it checks every field, bounds every size and verifies checksums. Every operation is idempotent
(``put`` writes only at the offset it was asked for), so the host may send one again after a
dropped connection and resume where the kernel actually is.
"""

import base64
import contextlib
import hashlib
import json
import os
import stat
import tempfile

MIME = "application/x-ci-magic-io+json"
TEMP_PREFIX = ".ci-magic-"
TEMP_SUFFIX = ".upload"
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
MAX_ENTRIES = 20000
MAX_DEPTH = 32
BLOCK = 1 << 20


def _path(root, relative):
    parts = relative.split("/")
    if not relative or relative.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError("refused file name " + repr(relative))
    return os.path.join(root, *parts)


def _open_regular(path):
    fd = os.open(path, os.O_RDONLY | NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ValueError("not a regular file")
    return fd, info


def _sha256_of(fd):
    digest = hashlib.sha256()
    os.lseek(fd, 0, 0)
    while True:
        block = os.read(fd, BLOCK)
        if not block:
            return digest.hexdigest()
        digest.update(block)


def _payload(args):
    """A chunk's base64: in the request's metadata (compiling it as a literal would cost more)."""
    if "data" in args:
        return args["data"]
    from IPython import get_ipython

    parent = get_ipython().kernel.get_parent("shell")
    return parent["metadata"]["ci_magic_data"]


def setup(args):
    """Choose the data folder: /mnt/data under the sandbox launcher, else a per-session folder."""
    cwd = os.getcwd()
    root = cwd if cwd == "/mnt/data" else os.path.join(tempfile.gettempdir(), "ci-magic", args["folder"])
    os.makedirs(root, mode=0o700, exist_ok=True)
    os.chdir(root)
    return {"root": root}


def cleanup(args):
    """Remove the per-session folder (never /mnt/data, which goes with the sandbox itself)."""
    import shutil

    base = os.path.join(tempfile.gettempdir(), "ci-magic")
    root = os.path.realpath(args["root"])
    if os.path.dirname(root) == os.path.realpath(base):
        shutil.rmtree(root, ignore_errors=True)
    return {}


def size(args):
    try:
        return {"size": os.stat(_path(args["root"], args["temp"]), follow_symlinks=False).st_size}
    except FileNotFoundError:
        return {"size": 0}


def put(args):
    path = _path(args["root"], args["temp"])
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        os.makedirs(folder, mode=0o755, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | NOFOLLOW, 0o644)
    try:
        have = os.fstat(fd).st_size
        if have != args["offset"]:
            return {"size": have}  # a resend after a dropped connection: tell where we are
        data = base64.b64decode(_payload(args))
        if hashlib.sha256(data).hexdigest() != args["sha256"]:
            return {"size": have, "corrupt": True}
        os.lseek(fd, have, 0)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        return {"size": have + len(data)}
    finally:
        os.close(fd)


def commit(args):
    temp, target = _path(args["root"], args["temp"]), _path(args["root"], args["name"])
    try:
        fd, info = _open_regular(temp)
    except FileNotFoundError:
        # Already committed (the answer was lost with the connection)?
        fd, info = _open_regular(target)
        try:
            same = info.st_size == args["size"] and _sha256_of(fd) == args["sha256"]
        finally:
            os.close(fd)
        return {"ok": same, "size": info.st_size, "mtime": info.st_mtime}
    try:
        digest = _sha256_of(fd)
    finally:
        os.close(fd)
    if info.st_size != args["size"] or digest != args["sha256"]:
        os.unlink(temp)
        return {"ok": False, "size": info.st_size}
    if os.path.isdir(target) and not os.path.islink(target):
        os.unlink(temp)
        raise ValueError("a folder has that name")
    os.replace(temp, target)  # replaces a symlink itself, never what it points to
    return {"ok": True, "size": info.st_size, "mtime": info.st_mtime}


def discard(args):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_path(args["root"], args["temp"]))
    return {}


def listing(args):
    root, found, count = args["root"], [], 0
    pending = [("", root, 0)]
    while pending and count <= MAX_ENTRIES:
        prefix, folder, depth = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            count += 1
            if count > MAX_ENTRIES:
                break
            name = entry.name
            if entry.is_symlink() or (name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)):
                continue
            if entry.is_file(follow_symlinks=False):
                info = entry.stat(follow_symlinks=False)
                found.append([prefix + name, info.st_size, info.st_mtime])
            elif entry.is_dir(follow_symlinks=False) and depth < MAX_DEPTH:
                pending.append((prefix + name + "/", entry.path, depth + 1))
    return {"files": found, "truncated": count > MAX_ENTRIES}


def digest(args):
    fd, info = _open_regular(_path(args["root"], args["name"]))
    try:
        return {"size": info.st_size, "allocated": info.st_blocks * 512, "sha256": _sha256_of(fd)}
    finally:
        os.close(fd)


def get(args):
    fd, _info = _open_regular(_path(args["root"], args["name"]))
    try:
        os.lseek(fd, args["offset"], 0)
        data = os.read(fd, args["length"])
    finally:
        os.close(fd)
    return {"data": base64.b64encode(data).decode("ascii"), "sha256": hashlib.sha256(data).hexdigest()}


def remove(args):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_path(args["root"], args["name"]))
    return {}


OPERATIONS = {
    "setup": setup,
    "cleanup": cleanup,
    "size": size,
    "put": put,
    "commit": commit,
    "discard": discard,
    "listing": listing,
    "digest": digest,
    "get": get,
    "remove": remove,
}


def main(text):
    from IPython.display import publish_display_data

    args = json.loads(text)
    try:
        answer = OPERATIONS[args["op"]](args)
    except FileNotFoundError:
        answer = {"error": "not found", "missing": True}
    except (OSError, ValueError) as err:
        answer = {"error": type(err).__name__ + ": " + str(err)}
    publish_display_data({MIME: answer})


main(globals()["ARGS"])  # set by the host in the exec namespace
