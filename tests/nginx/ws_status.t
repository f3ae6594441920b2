#!/usr/bin/perl

# Tests for nginx-ws: ws_status_zone counts every WebSocket tunnel of the http block (also in a
# location without other ws_* directives), ws_status prints the counters as JSON or
# Prometheus text (configured format, ?format= overriding it).

###############################################################################

use warnings;
use strict;

use Test::More;

use JSON::PP;

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

    ws_status_zone ws_test 1m;

    upstream echo { server 127.0.0.1:8081; }

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        location / {
            proxy_pass    http://echo;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "Upgrade";
        }

        location = /status {
            ws_status;
        }

        location = /metrics {
            ws_status prometheus;
        }
    }
}

EOF

$t->run_daemon(\&ws_echo_daemon, 8081, $t->testdir() . '/backend.log');
$t->run()->plan(10);

$t->waitforsocket('127.0.0.1:' . port(8081))
	or die "Can't start test backend";

###############################################################################

# one tunnel in a location without ws_* directives: two text messages, one binary, a close

my $s = ws_connect(8080, '/plain-location');
ok($s, 'handshake');
ws_send($s, ws_frame(1, 'one'));
ws_send($s, ws_frame(1, 'two'));
ws_send($s, ws_frame(2, 'bin'));
ws_read_frame($s) for 1 .. 3;
ws_send($s, ws_frame(8, ws_close_payload(1000)));
ws_read_frame($s);
ws_wait_closed($s);
undef $s;
select undef, undef, undef, 0.3;

my $r = http_get('/status');
like($r, qr!^HTTP/1\.1 200 .*^Content-Type: application/json!ms, 'json: status and type');
my ($body) = $r =~ /\x0d\x0a\x0d\x0a(.*)\z/s;
my $json = eval { decode_json($body) };
ok($json, 'json: parses') or diag($body);
is($json && $json->{zone}, 'ws_test', 'json: zone name');
my ($e) = grep { $_->{upstream} eq 'echo' } @{$json ? $json->{entries} : []};
is($e && join(' ', @{$e->{tunnels}}{qw/ opened closed active /}), '1 1 0',
	'json: tunnels opened, closed, active');
is($e && $e->{frames}{client}{text}, 2, 'json: client text frames');
is($e && $e->{ends}{normal}, 1, 'json: normal ends');

$r = http_get('/metrics');
like($r, qr/^nginx_ws_tunnels_opened_total\{route="",upstream="echo"\} 1$/m,
	'prometheus: configured format');
like($r, qr/^nginx_ws_messages_total\{route="",upstream="echo",direction="client",opcode="binary"\} 1$/m,
	'prometheus: client binary messages');
like(http_get('/status?format=prometheus'), qr/^# TYPE nginx_ws_tunnels_active gauge$/m,
	'?format=prometheus overrides json');

###############################################################################
