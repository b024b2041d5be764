#!/usr/bin/env python3
"""Couchbase's partial redaction as cbcollect_info's RegularLogProcessor
writes it (its two regular expressions, applied per line in this order),
for the differential test of the host's native redactor.

Reads a JSON object {"salt": str, "inputs": [base64, ...]} on stdin and
writes a JSON list of base64 outputs on stdout.
"""
import base64
import hashlib
import json
import re
import sys

REXES = [re.compile(rb'(<ud>)(.+?)(</ud>)'),
         re.compile(rb'(log-redaction-salt)(.+)')]


def redact(salt, data):
    def sub(match):
        result = match.group(1)
        if match.lastindex == 3:
            digest = hashlib.sha1(salt + match.group(2)).hexdigest()
            result += digest.encode() + match.group(3)
        else:
            result += b" <redacted>"
        return result

    out = []
    # Lines end at b"\n" only, which each line keeps.
    for line in re.split(rb'(?<=\n)', data):
        for rex in REXES:
            line = rex.sub(sub, line)
        out.append(line)
    return b"".join(out)


def main():
    request = json.load(sys.stdin)
    salt = request["salt"].encode()
    outputs = [base64.b64encode(redact(salt, base64.b64decode(i))).decode()
               for i in request["inputs"]]
    json.dump(outputs, sys.stdout)


if __name__ == "__main__":
    main()
