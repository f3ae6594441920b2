# Autobahn|Testsuite's own testee server (`wstest -m testeeserver`: an echo server that accepts
# every permessage-deflate offer as it is), bound to 127.0.0.1 only: wstest binds 0.0.0.0.
# Python 2.7, run with the wstest virtualenv's python by `cargo xtask autobahn --backend testee`.
#
# Usage: python autobahn-testee.py PORT
import sys

from autobahntestsuite import choosereactor  # noqa: F401 (installs the reactor wstest uses)
from twisted.internet import reactor
from autobahn.twisted.websocket import listenWS
from autobahntestsuite.testee import TesteeServerFactory

port = int(sys.argv[1])
listenWS(TesteeServerFactory("ws://127.0.0.1:%d" % port), interface="127.0.0.1")
reactor.run()
