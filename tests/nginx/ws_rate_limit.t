#!/usr/bin/perl

# Tests for nginx-ws: ws_limit_zone and ws_limit (message rate limits inside tunnels):
# nodelay refuses the message after the burst with Close 1008, shaping delays messages to the
# rate, ws_limit_dry_run forwards everything, $ws_limit_status says what happened.

###############################################################################

use warnings;
use strict;

use Test::More;
use Time::HiRes qw/time/;

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

    log_format ws '$request_uri $status limit=$ws_limit_status end=$ws_end';

    ws_limit_zone $connection zone=nodelay:1m rate=1r/m;
    ws_limit_zone $connection zone=shape:1m rate=10r/s;
    ws_limit_zone $connection zone=dry:1m rate=1r/m;

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        access_log %%TESTDIR%%/ws-access.log ws;

        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection "Upgrade";
        ws_close_timeout 2s;
        ws_log %%TESTDIR%%/ws.log;

        location /nodelay {
            proxy_pass    http://127.0.0.1:8081;
            ws_limit zone=nodelay burst=2 nodelay;
        }

        location /shape {
            proxy_pass    http://127.0.0.1:8081;
            ws_limit zone=shape;
        }

        location /dry {
            proxy_pass    http://127.0.0.1:8081;
            ws_limit zone=dry nodelay;
            ws_limit_dry_run on;
        }

        location /free {
            proxy_pass    http://127.0.0.1:8081;
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

# Sends $n text frames at once; returns the echoes' payloads, the Close frame if one came,
# and how long the echoes took.
sub tunnel {
	my ($uri, $n) = @_;

	open my $fh, '>', $record or die "Can't truncate $record: $!";
	close $fh;

	my $s = ws_connect(8080, $uri) or return;
	my $start = time();
	ws_send($s, join '', map { ws_frame(1, "m$_") } 1 .. $n);

	my (@echo, $close, $took);
	while (my $f = ws_read_frame($s, 5)) {
		if ($f->{opcode} == 8) {
			$close = $f;
			last;
		}
		push @echo, $f->{payload};
		$took = time() - $start;
		last if @echo == $n;
	}

	ws_send($s, ws_frame(8, ws_close_payload(1000)));
	ws_wait_closed($s, 4);
	select undef, undef, undef, 0.3;
	return (\@echo, $close, $took);
}

# nodelay: the first message and a burst of 2 pass, the fourth is refused

my ($echo, $close) = tunnel('/nodelay', 4);
is($close && $close->{code}, 1008, 'nodelay: close 1008');
is($close && $close->{reason}, 'rate limit', 'nodelay: close reason');
my @b = backend_frames($record);
is(scalar(grep { $_->{opcode} == 1 } @b), 3, 'nodelay: the refused message not forwarded');
my ($bc) = grep { $_->{opcode} == 8 } @b;
is($bc && $bc->{code}, 1001, 'nodelay: upstream close 1001');

# shaping: 3 messages at 10r/s are spaced by 100 ms, none refused

my $took;
($echo, $close, $took) = tunnel('/shape', 3);
is(scalar @$echo, 3, 'shape: all messages arrive');
ok(!$close, 'shape: not closed');
cmp_ok($took // 0, '>=', 0.18, 'shape: spaced at the rate');

# dry run: everything forwarded

($echo, $close) = tunnel('/dry', 4);
is(scalar @$echo, 4, 'dry run: all messages arrive');

($echo) = tunnel('/free', 2);
is(scalar @$echo, 2, 'no ws_limit');

$t->stop();

my $access = $t->read_file('ws-access.log');
like($access, qr!^/nodelay 101 limit=REJECTED end=rate_limited$!m, 'access log: rejected');
like($access, qr!^/shape 101 limit=DELAYED end=normal$!m, 'access log: delayed');
like($access, qr!^/dry 101 limit=REJECTED_DRY_RUN end=normal$!m, 'access log: dry run');
like($access, qr!^/free 101 limit=- end=normal$!m, 'access log: no limit applied');

###############################################################################
