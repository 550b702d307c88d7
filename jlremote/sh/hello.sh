# hello.sh: which login node this connection reached: `LOGIN NAME BOOT_ID ADDR` (ADDR:
# the address the client reached, from SSH_CONNECTION).
report LOGIN "$(node_id) $(node_addr)"
