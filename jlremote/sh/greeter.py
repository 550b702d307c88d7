"""doctor's forwarding test on the remote (run by fwdprobe.sh with the remote's python3):
greet one client on a Unix socket and one on 127.0.0.1 (any port), then go; gone in 15 s
at most. argv: the private directory (the port goes to DIR/port), the socket's path."""

import os
import select
import shutil
import socket
import sys

d, sock = sys.argv[1], sys.argv[2]
u = socket.socket(socket.AF_UNIX)
u.bind(sock)
u.listen(1)
t = socket.socket()
t.bind(("127.0.0.1", 0))
t.listen(1)
with open(d + "/port.tmp", "w") as f:
    f.write(str(t.getsockname()[1]))
os.rename(d + "/port.tmp", d + "/port")
left = [u, t]
try:
    while left:
        ready = select.select(left, [], [], 15)[0]
        if not ready:
            break
        for s in ready:
            c = s.accept()[0]
            c.sendall(b"jlremote-ok\n")
            c.close()
            left.remove(s)
finally:
    shutil.rmtree(os.path.dirname(sock), ignore_errors=True)
    shutil.rmtree(d, ignore_errors=True)
