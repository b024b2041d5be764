#!/usr/bin/python3
"""Stand-in for Couchbase's ``cbcollect_info``, for end-to-end tests.

Usage: cbcollect_info_standin.py [options] OUTPUT.zip

Options (``--opt=value`` or ``--opt value``; unknown options are accepted
and written to the ``cbcollect_info.log`` entry):
  --watch-stdin               abort (status 1, "stdin closed: aborting" on
                              stderr) when stdin reaches EOF
  --log-redaction-level=L     none (default) or partial: also write
                              OUTPUT-redacted.zip, <ud>X</ud> -> sha1(SALT+X)
  --log-redaction-salt=SALT   required with partial (else exit 2)
  --tmp-dir=DIR               where the temp file goes ($TMPDIR, else /tmp)
  --encrypt-unredacted        write OUTPUT.zip (the unredacted zip; not the
                              -redacted one) encrypted with pyzipper, WinZip
                              AES-256; needs --use-stdin (else exit 2)
  --use-stdin                 read the zip password as the first line of
                              stdin, before --watch-stdin starts watching (an
                              empty line or EOF: exit 2)
  --initargs=PATH, --task-regexp=REGEX   accepted and logged only

Environment:
  STANDIN_RECORD=FILE    append a JSON line {pid, pgid, argv, env} at start
                         (and {"grandchild": PID} if one is forked, and
                         {"stdin_password": {length, sha256}} when it read
                         a password: never the password itself)
  STANDIN_STEP_MS=N      milliseconds between progress lines (default 20)
  STANDIN_HANG=1         sleep forever after the first progress line
  STANDIN_FAIL=N         after the progress lines, print an error and exit N
  STANDIN_GRANDCHILD=1   fork a grandchild in the same process group that
                         ignores SIGTERM and sleeps forever

The temp file cbcollect-standin-<pid>.tmp is removed on every exit path
but SIGKILL; so are output zips (and .part files) of an unfinished run.
SIGTERM exits 143.
"""
import argparse, hashlib, json, os, re, signal, sys, threading, time, traceback
import zipfile

OWNER = os.getpid()
LOCK = threading.RLock()
tmp_file = None
created = []  # output files (.part and final) written by this run


def record(obj):
    path = os.environ.get("STANDIN_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(obj) + "\n")
            f.flush()
            os.fsync(f.fileno())


def exec_env():
    """The environment as exec'd: os.environ may hold Python's own additions
    (PEP 538 sets LC_CTYPE=C.UTF-8 when started with an empty environment)."""
    try:
        with open("/proc/self/environ", "rb") as f:
            pairs = [v.split(b"=", 1) for v in f.read().split(b"\0") if v]
        return {os.fsdecode(k): os.fsdecode(v) for k, v in pairs}
    except OSError:
        return dict(os.environ)


def finish(status, message=None, stream=sys.stdout, keep_outputs=False):
    """Clean up and exit the whole process (from any thread) with status."""
    with LOCK:
        if os.getpid() == OWNER:  # a forked grandchild never cleans up
            doomed = [tmp_file] + ([] if keep_outputs else created)
            for path in filter(None, doomed):
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
        if message:
            print(message, file=stream)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def watch_stdin():
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    finish(1, "stdin closed: aborting", sys.stderr)


def grandchild():
    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(fd, 0)
        os.close(fd)
        while True:
            time.sleep(3600)
    finally:
        os._exit(0)


def read_password_line():
    """The first line of stdin, read a byte at a time so that nothing after
    it is taken from --watch-stdin's watcher."""
    line = b""
    while not line.endswith(b"\n"):
        byte = os.read(0, 1)
        if not byte:
            break
        line += byte
    password = line.rstrip(b"\n")
    if not password:
        finish(2, "error: --use-stdin: no password line on stdin", sys.stderr)
    record({"stdin_password": {"length": len(password),
                               "sha256": hashlib.sha256(password).hexdigest()}})
    return password


def write_zip(path, entries, password=None):
    part = path + ".part"
    created.extend([part, path])
    if password is None:
        z = zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED)
    else:
        # Imported only here: the other tests do not need pyzipper.
        import pyzipper
        z = pyzipper.AESZipFile(part, "w", compression=pyzipper.ZIP_DEFLATED,
                                encryption=pyzipper.WZ_AES)
        z.setencryption(pyzipper.WZ_AES, nbits=256)
        z.setpassword(password)
    with z:
        for name, text in entries.items():
            z.writestr(name, text)
    os.replace(part, path)


def main():
    record({"pid": os.getpid(), "pgid": os.getpgid(0),
            "argv": sys.argv[1:], "env": exec_env()})
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("output")
    p.add_argument("--watch-stdin", action="store_true")
    p.add_argument("--log-redaction-level", choices=["none", "partial"],
                   default="none")
    p.add_argument("--log-redaction-salt")
    p.add_argument("--tmp-dir", default=os.environ.get("TMPDIR") or "/tmp")
    p.add_argument("--initargs")
    p.add_argument("--task-regexp")
    p.add_argument("--encrypt-unredacted", action="store_true")
    p.add_argument("--use-stdin", action="store_true")
    args, unknown = p.parse_known_args()
    if args.log_redaction_level == "partial" and args.log_redaction_salt is None:
        finish(2, "error: --log-redaction-salt is required with "
                  "--log-redaction-level=partial", sys.stderr)
    if args.encrypt_unredacted and not args.use_stdin:
        finish(2, "error: --encrypt-unredacted needs the password: "
                  "no terminal to ask on, give --use-stdin", sys.stderr)
    password = None
    if args.use_stdin:
        password = read_password_line()
        if not args.encrypt_unredacted:
            password = None

    global tmp_file
    signal.signal(signal.SIGTERM, lambda *_: finish(143))
    tmp_file = os.path.join(args.tmp_dir, "cbcollect-standin-%d.tmp" % OWNER)
    with open(tmp_file, "w") as f:
        f.write("stand-in\n")
    if args.watch_stdin:
        threading.Thread(target=watch_stdin, daemon=True).start()
    if os.environ.get("STANDIN_GRANDCHILD") == "1":
        pid = os.fork()
        if pid == 0:
            grandchild()
        record({"grandchild": pid})

    step = int(os.environ.get("STANDIN_STEP_MS") or 20) / 1000
    names = ["Collecting logs", "Collecting diagnostics", "Collecting stats",
             "Collecting system information", "Building zip"]
    lines = []
    for i, name in enumerate(names, 1):
        lines.append("[%d/5] %s" % (i, name))
        print(lines[-1], flush=True)
        if i == 1 and os.environ.get("STANDIN_HANG") == "1":
            while True:
                time.sleep(3600)
        time.sleep(step)

    fail = os.environ.get("STANDIN_FAIL")
    if fail:
        n = int(fail)
        print("cbcollect_info stand-in: failing as asked with status %d" % n)
        finish(n, "\n".join("error detail line %d" % k for k in (1, 2, 3)))

    log = "\n".join(lines + ["args: " + json.dumps(sys.argv[1:]),
                             "unknown options: " + json.dumps(unknown)]) + "\n"
    couchbase = ("[ns_server:info] starting stand-in node\n"
                 "[ns_server:info] user: <ud>Administrator</ud> logged in\n"
                 "[ns_server:info] bucket <ud>travel-sample</ud> ready\n")
    entries = {"cbcollect_info.log": log, "couchbase.log": couchbase}
    write_zip(args.output, entries, password)
    if args.log_redaction_level == "partial":
        salt = args.log_redaction_salt
        redact = lambda m: "<ud>%s</ud>" % hashlib.sha1(
            (salt + m.group(1)).encode()).hexdigest()
        base = args.output[:-4] if args.output.endswith(".zip") else args.output
        write_zip(base + "-redacted.zip",
                  {k: re.sub(r"<ud>(.*?)</ud>", redact, v)
                   for k, v in entries.items()})
    finish(0, "Zipfile built: " + args.output, keep_outputs=True)


if __name__ == "__main__":
    try:
        main()
    except Exception:  # e.g. a bad --tmp-dir: still remove what we made
        traceback.print_exc()
        finish(1)
