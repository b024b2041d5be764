#!/usr/bin/python3
"""Decrypt a WinZip AES zip with pyzipper, for the end-to-end tests: an
implementation independent of the one that wrote it.

Usage: unzip_aes.py ZIP MEMBER < password-line

Reads the password as one line on stdin (never on the command line), then
checks that every entry of ZIP is encrypted with WinZip AES, 256-bit, and
prints MEMBER, decrypted, on stdout.

Exit status: 0 done; 1 wrong password (pyzipper's "Bad password"); 2 an
entry is not AES-256 encrypted, or MEMBER is missing, or ZIP is not a zip;
3 pyzipper is not installed (.ci/setup installs it for /usr/bin/python3).
"""
import sys
import zipfile

try:
    import pyzipper
except ImportError:
    print("unzip_aes.py: pyzipper is not installed for %s "
          "(.ci/setup installs it)" % sys.executable, file=sys.stderr)
    sys.exit(3)

AES_256 = 3  # WinZip AES key strength code for 256 bits


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    path, member = sys.argv[1], sys.argv[2]
    password = sys.stdin.buffer.readline().rstrip(b"\n")
    try:
        archive = pyzipper.AESZipFile(path)
    except (OSError, zipfile.BadZipFile, pyzipper.BadZipFile) as e:
        print("unzip_aes.py: %s: %s" % (path, e), file=sys.stderr)
        sys.exit(2)
    with archive:
        for info in archive.infolist():
            encrypted = info.flag_bits & 0x1
            if not encrypted or info.wz_aes_strength != AES_256:
                print("unzip_aes.py: %s in %s is not AES-256 encrypted "
                      "(encrypted: %s, AES strength code: %s)"
                      % (info.filename, path, bool(encrypted),
                         info.wz_aes_strength), file=sys.stderr)
                sys.exit(2)
        if member not in archive.namelist():
            print("unzip_aes.py: no %s in %s (has %s)"
                  % (member, path, archive.namelist()), file=sys.stderr)
            sys.exit(2)
        archive.setpassword(password)
        try:
            data = archive.read(member)
        # "Bad password for file ..."; a wrong password that passes the
        # 2-byte verifier (1 in 65536) fails the HMAC check instead.
        except (RuntimeError, pyzipper.BadZipFile) as e:
            print("unzip_aes.py: %s" % e, file=sys.stderr)
            sys.exit(1)
    sys.stdout.buffer.write(data)


if __name__ == "__main__":
    main()
