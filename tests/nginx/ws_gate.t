#!/usr/bin/perl

# Tests for nginx-ws: the request gate. ws_route picks the upstream of an upgrade request by
# $uri and subprotocol ($ws_upstream, $ws_route; 404 and 426 without a default),
# ws_allow_origin refuses other origins with 403, ws_handshake strict refuses malformed upgrade
# requests (400, 426) and an upstream 101 with a wrong Sec-WebSocket-Accept (502); every
# refusal writes a reject record.

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

    log_format gate '$request_uri $status route=$ws_route upstream=$ws_upstream';

    upstream a { server 127.0.0.1:8081; }
    upstream b { server 127.0.0.1:8082; }

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        access_log %%TESTDIR%%/gate-access.log gate;

        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection "Upgrade";
        ws_log %%TESTDIR%%/ws.log;
        ws_log_events open close reject;

        location /r/ {
            ws_route =/r/exact b;
            ws_route /r/a a;
            ws_route ~^/r/b[0-9]+$ b;
            ws_route /r/proto a protocol=chat.v2;
            proxy_pass http://$ws_upstream;
        }

        location /d/ {
            ws_route /d/b b;
            ws_route default a;
            proxy_pass http://$ws_upstream;
        }

        location /o/ {
            ws_allow_origin https://app.example.com https://*.example.org;
            proxy_pass http://127.0.0.1:8081;
        }

        location /od/ {
            ws_allow_origin * missing=deny;
            proxy_pass http://127.0.0.1:8081;
        }

        location /h/ {
            ws_handshake strict;
            proxy_pass http://127.0.0.1:8081;
        }

        location /bad-accept {
            ws_handshake strict;
            proxy_pass http://127.0.0.1:8083;
        }

        location /lax-accept {
            proxy_pass http://127.0.0.1:8083;
        }
    }
}

EOF

my $dir = $t->testdir();

# A backend that answers every upgrade with a 101 carrying a wrong Sec-WebSocket-Accept.
sub bad_accept_daemon {
	my $server = IO::Socket::INET->new(
		Proto => 'tcp',
		LocalAddr => '127.0.0.1:' . port(8083),
		Listen => 5,
		Reuse => 1,
	)
		or die "Can't create listening socket: $!\n";

	while (my $client = $server->accept()) {
		my $req = '';
		while ($req !~ /\x0d\x0a\x0d\x0a/) {
			$client->sysread(my $buf, 4096) or last;
			$req .= $buf;
		}
		$client->syswrite("HTTP/1.1 101 Switching Protocols\x0d\x0a"
			. "Upgrade: websocket\x0d\x0aConnection: Upgrade\x0d\x0a"
			. "Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\x0d\x0a\x0d\x0a");
		select undef, undef, undef, 1;
		close $client;
	}
}

$t->run_daemon(\&ws_echo_daemon, 8081, "$dir/a.log");
$t->run_daemon(\&ws_echo_daemon, 8082, "$dir/b.log");
$t->run_daemon(\&bad_accept_daemon);
$t->run()->plan(28);

for my $p (8081, 8082, 8083) {
	$t->waitforsocket('127.0.0.1:' . port($p)) or die "Can't start test backend $p";
}

###############################################################################

# Upgrade request; returns the status (and closes a tunnel it opened with a Close, after one
# echoed message, so that backend records show which upstream served it).
sub status {
	my ($uri, %h) = @_;
	my ($status, $head, $s) = ws_request(8080, $uri, 'Connection' => 'Upgrade, close', %h);
	if ($status == 101) {
		ws_send($s, ws_frame(1, $uri));
		ws_read_frame($s);
		ws_send($s, ws_frame(8, ws_close_payload(1000)));
		ws_wait_closed($s);
	}
	return wantarray ? ($status, $head) : $status;
}

# Which backend got the text message $uri.
sub served_by {
	my ($uri) = @_;
	my @who;
	for my $b (qw/ a b /) {
		open my $fh, '<', "$dir/$b.log" or next;
		my @frames = <$fh>;
		push @who, $b if grep { /^1 (\d+) / && $1 == length $uri } @frames;
	}
	return join ',', @who;
}

sub truncate_backend_logs {
	for my $b (qw/ a b /) {
		open my $fh, '>', "$dir/$b.log" or die;
	}
}

# ws_route

for my $case (['/r/a1', 'a'], ['/r/b12', 'b'], ['/r/exact', 'b'], ['/d/b', 'b'],
	['/d/other', 'a'])
{
	my ($uri, $want) = @$case;
	truncate_backend_logs();
	is(status($uri), 101, "ws_route: $uri upgraded");
	select undef, undef, undef, 0.2;
	is(served_by($uri), $want, "ws_route: $uri went to upstream $want");
}

is(status('/r/exact/more'), 404, 'ws_route: no rule matches: 404');
is(status('/r/proto'), 404, 'ws_route: protocol= rule without the subprotocol: 404');
is(status('/r/proto', 'Sec-WebSocket-Protocol' => 'chat.v1, chat.v2'), 101,
	'ws_route: protocol= rule with the subprotocol offered');
like(http_get('/r/a'), qr!^HTTP/1\.1 426 .*^Upgrade: websocket\x0d?$!ms,
	'ws_route: plain request without a default: 426');

# ws_allow_origin

is(status('/o/x', Origin => 'https://app.example.com'), 101, 'origin: exact');
is(status('/o/x', Origin => 'https://a.b.example.org'), 101, 'origin: wildcard subdomain');
is(status('/o/x', Origin => 'https://example.org.evil.com'), 403, 'origin: other: 403');
is(status('/o/x'), 101, 'origin: none, allowed by default');
is(status('/od/x'), 403, 'origin: none with missing=deny: 403');

# ws_handshake strict

is(status('/h/x'), 101, 'strict: valid handshake');
is(status('/h/x', 'Sec-WebSocket-Key' => 'c2hvcnQ='), 400, 'strict: key of 5 bytes: 400');
is(status('/h/x', 'Sec-WebSocket-Key' => undef), 400, 'strict: no key: 400');
my ($st, $head) = status('/h/x', 'Sec-WebSocket-Version' => '8');
is($st, 426, 'strict: version 8: 426');
like($head, qr/^Sec-WebSocket-Version: 13$/mi, 'strict: 426 names version 13');
is(status('/bad-accept'), 502, 'strict: wrong Sec-WebSocket-Accept from the upstream: 502');
is(status('/lax-accept'), 101, 'off: the same 101 passes');

# reject records

$t->stop();

my @rejects = grep { $_->{event} eq 'reject' } ws_records("$dir/ws.log");
is(join(' ', map { "$_->{reason}:$_->{status}" } @rejects),
	'no_route:404 no_route:404 not_upgrade:426 origin:403 origin:403 '
	. 'handshake:400 handshake:400 handshake:426 handshake:502',
	'reject records: reason and status of every refusal');

like($t->read_file('gate-access.log'), qr!^/r/b12 101 route=~\^/r/b\[0-9\]\+\$ upstream=b$!m,
	'$ws_route and $ws_upstream in the access log');

###############################################################################
