#!/usr/bin/perl

# Tests for nginx-ws: ws_drain sends every tunnel of a worker that begins a graceful shutdown
# (here: a reload) Close 1012 "service restart" within the drain time; without ws_drain the
# tunnel stays open, as with stock nginx.

###############################################################################

use warnings;
use strict;

use Test::More;

use Time::HiRes qw/ time /;

BEGIN { use FindBin; chdir($FindBin::Bin); }

use lib 'lib';
use NginxWs::Harness;
use NginxWs;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

skip_unless_ready();

my $t = NginxWs::Harness->new()->has(qw/http proxy/)
	->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;
worker_shutdown_timeout 10s;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection "Upgrade";
        proxy_read_timeout 30s;
        ws_log %%TESTDIR%%/ws.log;

        location /drain {
            proxy_pass http://127.0.0.1:8081;
            ws_drain 1s;
        }

        location /stay {
            proxy_pass http://127.0.0.1:8082;
        }
    }
}

EOF

# the echo daemon serves one connection at a time: one for each tunnel
$t->run_daemon(\&ws_echo_daemon, 8081, $t->testdir() . '/backend1.log');
$t->run_daemon(\&ws_echo_daemon, 8082, $t->testdir() . '/backend2.log');
$t->run()->plan(6);

for my $p (8081, 8082) {
	$t->waitforsocket('127.0.0.1:' . port($p)) or die "Can't start test backend $p";
}

###############################################################################

my $drained = ws_connect(8080, '/drain');
my $stays = ws_connect(8080, '/stay');
ok($drained && $stays, 'handshakes');

$t->reload();
my $start = time();

my $close;
while ($drained && !$close && time() - $start < 5) {
	my $f = ws_read_frame($drained, 0.5) or next;
	$close = $f if $f->{opcode} == 8;
}
my $elapsed = time() - $start;
is($close && "$close->{code} $close->{reason}", '1012 service restart', 'drain: close frame');
ok($elapsed < 2.5, "drain: within the drain time after the reload (${elapsed}s)");
ws_send($drained, ws_frame(8, ws_close_payload(1012))) if $drained;
ok($drained && ws_wait_closed($drained), 'drain: connection closed');

# the tunnel without ws_drain is still open and working

ws_send($stays, ws_frame(1, 'still here')) if $stays;
my $f = $stays && ws_read_frame($stays);
is($f && $f->{payload}, 'still here', 'no ws_drain: tunnel untouched');
ws_send($stays, ws_frame(8, ws_close_payload(1000))) if $stays;
ws_wait_closed($stays) if $stays;

my @r = ws_wait_records($t->testdir() . '/ws.log',
	sub { $_[0]{event} eq 'close' && $_[0]{end} eq 'drain' });
ok((grep { $_->{event} eq 'close' && $_->{end} eq 'drain' } @r), 'drain: close record end');

###############################################################################
