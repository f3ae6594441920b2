#!/usr/bin/perl

# Tests for nginx-ws: ws_max_lifetime (Close 1001 "max lifetime" however busy the tunnel),
# ws_ping_interval and ws_pong_timeout (proxy Pings to a silent client, its Pong consumed,
# Close 1001 "ping timeout" when it stays silent), ws_close_timeout (connections closed when a
# peer does not answer the proxy's Close).

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

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection "Upgrade";
        proxy_read_timeout 30s;
        ws_log %%TESTDIR%%/ws.log;

        location /lifetime {
            proxy_pass http://127.0.0.1:8081;
            ws_max_lifetime 1500ms;
        }

        location /ping {
            proxy_pass http://127.0.0.1:8081;
            ws_ping_interval 500ms;
            ws_pong_timeout 1s;
        }

        location /close-timeout {
            proxy_pass http://127.0.0.1:8081;
            ws_idle_timeout 500ms;
            ws_close_timeout 1500ms;
        }
    }
}

EOF

my $record = $t->testdir() . '/backend.log';

$t->run_daemon(\&ws_echo_daemon, 8081, $record);
$t->run()->plan(13);

$t->waitforsocket('127.0.0.1:' . port(8081))
	or die "Can't start test backend";

###############################################################################

# ws_max_lifetime: a message every 0.3 s does not keep the tunnel open

my $s = ws_connect(8080, '/lifetime');
my $start = time();
my ($close, $echoed) = (undef, 0);
while ($s && !$close && time() - $start < 5) {
	ws_send($s, ws_frame(1, 'busy'));
	while (my $f = ws_read_frame($s, 0.3)) {
		$f->{opcode} == 8 ? ($close = $f) : $echoed++;
	}
}
my $elapsed = time() - $start;
is($close && "$close->{code} $close->{reason}", '1001 max lifetime', 'lifetime: close frame');
ok($elapsed > 1.2 && $elapsed < 3, "lifetime: closed after ${elapsed}s, $echoed echoes");
ws_send($s, ws_frame(8, ws_close_payload(1001))) if $s;
ok($s && ws_wait_closed($s), 'lifetime: connection closed');

# ws_ping_interval: a silent client gets Pings; its Pongs keep the tunnel open and are not
# forwarded

open my $fh, '>', $record or die;
close $fh;

$s = ws_connect(8080, '/ping');
my @pings;
$start = time();
while ($s && @pings < 2 && time() - $start < 4) {
	my $f = ws_read_frame($s, 1) or next;
	next unless $f->{opcode} == 9;
	push @pings, time() - $start;
	ws_send($s, ws_frame(10, $f->{payload}));
	like($f->{payload}, qr/^ngx-ws-ping-/, 'ping: payload ' . scalar @pings);
}
is(scalar @pings, 2, 'ping: two pings to a silent client that answers');
ok(@pings && $pings[0] > 0.3 && $pings[0] < 1.5, "ping: first after ${\($pings[0] // '-')}s");

# then silence: ping timeout

$start = time();
$close = undef;
while ($s && !$close && time() - $start < 5) {
	my $f = ws_read_frame($s, 0.5) or next;
	$close = $f if $f->{opcode} == 8;
}
$elapsed = time() - $start;
is($close && "$close->{code} $close->{reason}", '1001 ping timeout', 'pong timeout: close frame');
ok($elapsed > 0.8 && $elapsed < 3.5, "pong timeout: closed after ${elapsed}s of silence");
ws_send($s, ws_frame(8, ws_close_payload(1001))) if $s;
ws_wait_closed($s) if $s;
select undef, undef, undef, 0.3;
is(scalar(grep { $_->{opcode} == 10 } backend_frames($record)), 0,
	'ping: the pongs did not reach the upstream');

# ws_close_timeout: a client that never answers the proxy's Close is closed after it

$s = ws_connect(8080, '/close-timeout');
$close = ws_read_frame($s, 3) if $s;
my $closed_at = time();
is($close && $close->{code}, 1001, 'close timeout: the idle close frame');
ok($s && ws_wait_closed($s, 5), 'close timeout: connection closed without a reply');
$elapsed = time() - $closed_at;
ok($elapsed > 1 && $elapsed < 3.5, "close timeout: closed ${elapsed}s after the close frame");

###############################################################################
