#!/usr/bin/perl

# Tests for nginx-ws: ws_log records (open, frame, message, close) of a proxied WebSocket
# tunnel, ws_log_payload, and the $ws_* variables in access_log.
#
# Run with scripts/nginx-tests <nginx-tests checkout>, or by hand with the module loaded:
#   TEST_NGINX_BINARY=/path/to/nginx \
#   TEST_NGINX_GLOBALS="load_module /abs/path/libnginx_ws.so;" \
#   prove -I /path/to/nginx-tests/lib tests/nginx/

###############################################################################

use warnings;
use strict;

use Test::More;

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

    log_format ws '$request_uri $status frames=$ws_client_frames/$ws_upstream_frames '
                  'messages=$ws_client_messages/$ws_upstream_messages '
                  'bytes=$ws_client_bytes/$ws_upstream_bytes '
                  'close=$ws_close_code reason=$ws_close_reason by=$ws_closed_by '
                  'end=$ws_end duration=$ws_duration';

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        access_log %%TESTDIR%%/ws-access.log ws;

        location / {
            proxy_pass    http://127.0.0.1:8081;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "Upgrade";
            proxy_read_timeout 5s;

            ws_log %%TESTDIR%%/ws.log;
            ws_log_events open frame message close;
            ws_log_payload 4;
        }

        location /untracked {
            proxy_pass    http://127.0.0.1:8081;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "Upgrade";

            ws_log off;
        }

        location /plain {
            return 200 "plain\n";
        }
    }
}

EOF

$t->run_daemon(\&ws_echo_daemon, 8081, $t->testdir() . '/backend.log');
$t->run()->plan(34);

$t->waitforsocket('127.0.0.1:' . port(8081))
	or die "Can't start test backend";

my $log = $t->testdir() . '/ws.log';

###############################################################################

# one tunnel: a text message, a fragmented binary message, a ping, a close from the client

my $s = ws_connect(8080, '/chat?token=secret');
ok($s, 'handshake');

ws_send($s, ws_frame(1, 'hello'));
my $f = ws_read_frame($s);
is($f && $f->{payload}, 'hello', 'echo');

ws_send($s, ws_frame(2, "\x00\x01", fin => 0) . ws_frame(0, "\x02\x03\x04", fin => 0)
	. ws_frame(0, "\x05"));
my $got = '';
for (1 .. 3) {
	$f = ws_read_frame($s) or last;
	$got .= $f->{payload};
}
is($got, "\x00\x01\x02\x03\x04\x05", 'fragmented echo');

ws_send($s, ws_frame(9, 'p'));
$f = ws_read_frame($s);
is($f && $f->{opcode}, 10, 'pong');

ws_send($s, ws_frame(8, ws_close_payload(1000, 'bye')));
$f = ws_read_frame($s);
is($f && $f->{code}, 1000, 'close echoed');
ok(ws_wait_closed($s), 'connection closed');
undef $s;

my @r = ws_wait_records($log, sub { $_[0]{event} eq 'close' });
my ($open) = grep { $_->{event} eq 'open' } @r;
my ($close) = grep { $_->{event} eq 'close' } @r;
my @frames = grep { $_->{event} eq 'frame' } @r;
my @messages = grep { $_->{event} eq 'message' } @r;

is(scalar(grep { $_->{event} eq 'NOT-JSON' } @r), 0, 'every line is JSON');
is(join(',', map { $_->{event} } @r[0, -1]), 'open,close', 'open first, close last');

is($open->{uri}, '/chat', 'open uri without query string');
like($open->{upstream}, qr/^127\.0\.0\.1:\d+$/, 'open upstream');
like($open->{client}, qr/^127\.0\.0\.1:\d+$/, 'open client');
like($open->{time}, qr/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/, 'time format');

# client: text, 3 fragments, ping, close; upstream: the same echoed, pong, close
is(scalar @frames, 12, 'frame records');
my ($ct) = grep { $_->{from} eq 'client' && $_->{opcode} eq 'text' } @frames;
ok($ct && $ct->{masked} && $ct->{len} == 5 && $ct->{fin}, 'client text frame');
is($ct && $ct->{payload}, 'hell', 'payload captured up to ws_log_payload');
ok($ct && $ct->{payload_truncated}, 'payload truncated');
my ($ut) = grep { $_->{from} eq 'upstream' && $_->{opcode} eq 'text' } @frames;
ok($ut && !$ut->{masked} && $ut->{len} == 5, 'upstream text frame');
is(join(',', map { $_->{opcode} } grep { $_->{from} eq 'client' } @frames),
	'text,binary,continuation,continuation,ping,close', 'client opcodes in order');
my ($cc) = grep { $_->{from} eq 'client' && $_->{opcode} eq 'close' } @frames;
is($cc && "$cc->{code} $cc->{reason}", '1000 bye', 'close frame code and reason');

my ($bm) = grep { $_->{from} eq 'client' && $_->{type} eq 'binary' } @messages;
ok($bm && $bm->{len} == 6 && $bm->{frames} == 3, 'fragmented message record');
is($bm && $bm->{payload}, 'AAECAw==', 'binary payload as base64');
is(scalar @messages, 4, 'message records');

is($close->{end}, 'normal', 'close end');
is($close->{closed_by}, 'client', 'closed by');
is($close->{client}{frames}, 6, 'client frames');
is($close->{client}{close_code}, 1000, 'client close code');
is($close->{upstream}{frames}, 6, 'upstream frames');

# a message pipelined behind the handshake goes through the tunnel and is logged

$s = ws_connect(8080, '/pipelined', ws_frame(1, 'early'));
$f = $s && ws_read_frame($s);
is($f && $f->{payload}, 'early', 'pipelined echo');
ws_send($s, ws_frame(8, ws_close_payload(1000))) if $s;
ws_wait_closed($s) if $s;
undef $s;

@r = ws_wait_records($log, sub { $_[0]{event} eq 'close' && $_[0]{client}{frames} == 2 });
ok((grep { $_->{event} eq 'frame' && $_->{from} eq 'client' && ($_->{payload} // '') eq 'earl' }
	@r), 'pipelined frame logged');

# a location with ws_log off writes nothing

my $lines = () = ws_records($log);
$s = ws_connect(8080, '/untracked');
ws_send($s, ws_frame(1, 'x')) if $s;
ws_read_frame($s) if $s;
ws_send($s, ws_frame(8, ws_close_payload(1000))) if $s;
ws_wait_closed($s) if $s;
undef $s;
select undef, undef, undef, 0.3;
is(scalar(() = ws_records($log)), $lines, 'ws_log off: no records');

# access_log variables

like(http_get('/plain'), qr/plain/, 'plain request');

$t->stop();

my $access = $t->read_file('ws-access.log');
like($access, qr!^/chat\?token=secret 101 frames=6/6 messages=2/2 bytes=17/17 close=1000 reason=bye by=client end=normal duration=\d+\.\d{3}$!m,
	'access log variables');
like($access, qr!^/untracked 101 frames=-/- messages=-/- bytes=-/- close=- reason=- by=- end=- duration=-$!m,
	'untracked tunnel: variables not found');
like($access, qr!^/plain 200 frames=-/- .* end=- duration=-$!m, 'plain request: variables not found');

###############################################################################
