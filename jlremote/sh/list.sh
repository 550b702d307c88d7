# list.sh: report every live jlremote server of this user here (ENTRY blocks) and remove
# the directories of dead ones.
scan ''
