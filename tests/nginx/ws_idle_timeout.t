#!/usr/bin/perl

# Tests for nginx-ws: ws_idle_timeout closes an idle tunnel with Close 1001 "idle timeout" to
# both peers; pings do not count as activity.

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

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    log_format ws '$request_uri $status close=$ws_close_code by=$ws_closed_by end=$ws_end';

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        access_log %%TESTDIR%%/ws-access.log ws;

        location / {
            proxy_pass    http://127.0.0.1:8081;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "Upgrade";
            proxy_read_timeout 30s;

            ws_log %%TESTDIR%%/ws.log;
            ws_idle_timeout 1s;
            ws_close_timeout 2s;
        }
    }
}

EOF

my $record = $t->testdir() . '/backend.log';

$t->run_daemon(\&ws_echo_daemon, 8081, $record);
$t->run()->plan(14);

$t->waitforsocket('127.0.0.1:' . port(8081))
	or die "Can't start test backend";

###############################################################################

my $s = ws_connect(8080, '/idle');
ok($s, 'handshake');

ws_send($s, ws_frame(1, 'data'));
my $f = ws_read_frame($s);
is($f && $f->{payload}, 'data', 'echo');

# a ping every 0.3s: pings are not activity, the tunnel still times out

my $start = time();
my $close;
my $pings = 0;

while (time() - $start < 5) {
	ws_send($s, ws_frame(9, 'ping')) unless $close;
	$pings++;
	while (my $g = ws_read_frame($s, 0.3)) {
		if ($g->{opcode} == 8) {
			$close = $g;
			last;
		}
	}
	last if $close;
}

my $elapsed = time() - $start;

ok($close, 'close frame from the proxy');
is($close && $close->{code}, 1001, 'close code 1001');
is($close && $close->{reason}, 'idle timeout', 'close reason');
ok($elapsed > 0.8 && $elapsed < 2.5, "closed after the idle time despite $pings pings")
	or diag("elapsed $elapsed s");

ws_send($s, ws_frame(8, ws_close_payload(1001)));
ok(ws_wait_closed($s, 4), 'connection closed after the close handshake');
undef $s;

my @r = ws_wait_records($t->testdir() . '/ws.log', sub { $_[0]{event} eq 'close' });
my ($rec) = grep { $_->{event} eq 'close' } @r;
is($rec && $rec->{end}, 'idle_timeout', 'close record end');
is($rec && $rec->{closed_by}, 'proxy', 'close record closed_by');

# the upstream got a masked Close 1001 too

my @b = backend_frames($record);
my ($bc) = grep { $_->{opcode} == 8 } @b;
ok($bc && $bc->{code} == 1001 && $bc->{masked}, 'upstream got masked close 1001');
is(scalar(grep { $_->{opcode} == 1 } @b), 1, 'upstream got one data frame');
ok(scalar(grep { $_->{opcode} == 9 } @b) >= 2, 'the pings reached the upstream');

# data frames are activity: a data frame every 0.4s keeps the tunnel open past the idle time

$s = ws_connect(8080, '/busy');
my $echoed = 0;
$close = undef;
$start = time();

while ($s && time() - $start < 2.5) {
	ws_send($s, ws_frame(1, 'tick'));
	while (my $g = ws_read_frame($s, 0.4)) {
		$g->{opcode} == 8 ? ($close = $g) : $echoed++;
	}
	last if $close;
}

ok(!$close && $echoed >= 5, "data keeps the tunnel open ($echoed echoes)");
ws_send($s, ws_frame(8, ws_close_payload(1000))) if $s;
ws_wait_closed($s) if $s;
undef $s;

$t->stop();

like($t->read_file('ws-access.log'), qr!^/idle 101 close=1001 by=proxy end=idle_timeout$!m,
	'access log');

###############################################################################
