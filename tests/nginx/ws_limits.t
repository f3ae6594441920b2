#!/usr/bin/perl

# Tests for nginx-ws: ws_max_frame_size (Close 1009 to the sender of an oversized frame,
# 1001 to the other peer, the frame not forwarded), ws_max_message_size (the same for a
# fragmented message) and ws_protocol_check (Close 1002).

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

    log_format ws '$request_uri $status close=$ws_close_code by=$ws_closed_by end=$ws_end';

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        access_log %%TESTDIR%%/ws-access.log ws;

        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection "Upgrade";
        proxy_read_timeout 10s;
        ws_close_timeout 2s;
        ws_log %%TESTDIR%%/ws.log;

        location /limit {
            proxy_pass    http://127.0.0.1:8081;
            ws_max_frame_size 1k;
        }

        location /message {
            proxy_pass    http://127.0.0.1:8081;
            ws_max_message_size 1k;
        }

        location /check {
            proxy_pass    http://127.0.0.1:8081;
            ws_protocol_check on;
        }
    }
}

EOF

my $record = $t->testdir() . '/backend.log';

$t->run_daemon(\&ws_echo_daemon, 8081, $record);
$t->run()->plan(23);

$t->waitforsocket('127.0.0.1:' . port(8081))
	or die "Can't start test backend";

###############################################################################

# Runs one tunnel: sends $frame after a 1024-byte frame (at the limit: forwarded) and returns
# (the first non-data frame the client got, the frames the backend got, the data frames the
# client got after $frame).
sub refused {
	my ($uri, $frame) = @_;

	open my $fh, '>', $record or die "Can't truncate $record: $!";
	close $fh;

	my $s = ws_connect(8080, $uri) or return;

	ws_send($s, ws_frame(2, 'y' x 1024));
	my $f = ws_read_frame($s);
	return unless $f && length $f->{payload} == 1024;

	ws_send($s, $frame);
	my @data;
	while ($f = ws_read_frame($s, 5)) {
		last if $f->{opcode} >= 8;
		push @data, $f;
	}

	# answer the proxy's Close, as a client does
	ws_send($s, ws_frame(8, ws_close_payload(1000)));
	ws_wait_closed($s, 4);

	# the backend records its frames as it reads them
	select undef, undef, undef, 0.3;
	return ($f, [ backend_frames($record) ], \@data);
}

# an oversized client frame

my ($f, $b) = refused('/limit/client', ws_frame(1, 'x' x 2000));
is($f && $f->{code}, 1009, 'client: close 1009');
is($f && $f->{reason}, 'message too big', 'client: close reason');
ok(!grep({ $_->{len} == 2000 } @{$b || []}), 'oversized frame not forwarded');
my ($bc) = grep { $_->{opcode} == 8 } @{$b || []};
is($bc && $bc->{code}, 1001, 'upstream: close 1001');

# an oversized upstream frame: the upstream sends 3000 bytes when asked

my $data;
($f, $b, $data) = refused('/limit/upstream', ws_frame(1, 'big:3000'));
is($f && $f->{code}, 1001, 'client of a refused upstream frame: close 1001');
is($data && scalar @$data, 0, 'oversized upstream frame not forwarded');
($bc) = grep { $_->{opcode} == 8 } @{$b || []};
is($bc && $bc->{code}, 1009, 'upstream: close 1009');
ok($bc && $bc->{masked}, 'close to the upstream is masked');

# a fragmented client message over the message size, in frames under it

($f, $b) = refused('/message', ws_frame(1, 'm' x 600, fin => 0) . ws_frame(0, 'm' x 600));
is($f && "$f->{code} $f->{reason}", '1009 message too big', 'message: close 1009');
ok(!grep({ $_->{opcode} == 0 } @{$b || []}), 'message: the fragment over the limit not forwarded');
($bc) = grep { $_->{opcode} == 8 } @{$b || []};
is($bc && $bc->{code}, 1001, 'message: upstream close 1001');

# protocol check: RSV1 without an extension, an unmasked client frame, a reserved opcode

($f, $b) = refused('/check/rsv', ws_frame(1, 'rsv', rsv => 4));
is($f && $f->{code}, 1002, 'rsv1: close 1002');
is($f && $f->{reason}, 'protocol error', 'rsv1: close reason');
ok(!grep({ $_->{opcode} == 1 } @{$b || []}), 'rsv1: frame not forwarded');
($bc) = grep { $_->{opcode} == 8 } @{$b || []};
is($bc && $bc->{code}, 1001, 'rsv1: upstream close 1001');

($f) = refused('/check/unmasked', ws_frame(1, 'plain', mask => 0));
is($f && $f->{code}, 1002, 'unmasked client frame: close 1002');

($f) = refused('/check/opcode', ws_frame(3, 'x'));
is($f && $f->{code}, 1002, 'reserved opcode: close 1002');

($f) = refused('/check/ping', ws_frame(9, 'p' x 126));
is($f && $f->{code}, 1002, 'control frame over 125 bytes: close 1002');

# records and variables

my @r = ws_wait_records($t->testdir() . '/ws.log',
	sub { $_[0]{event} eq 'close' && $_[0]{end} eq 'protocol_error' });
is(join(',', map { $_->{end} } grep { $_->{event} eq 'close' } @r),
	'too_big,too_big,too_big,protocol_error,protocol_error,protocol_error,protocol_error',
	'close records end');
is(join(',', map { $_->{closed_by} } grep { $_->{event} eq 'close' } @r),
	'proxy,proxy,proxy,proxy,proxy,proxy,proxy', 'close records closed_by');

$t->stop();

my $access = $t->read_file('ws-access.log');
like($access, qr!^/limit/client 101 close=1009 by=proxy end=too_big$!m, 'access log: client');
like($access, qr!^/limit/upstream 101 close=1009 by=proxy end=too_big$!m,
	'access log: upstream');
like($access, qr!^/check/rsv 101 close=1002 by=proxy end=protocol_error$!m, 'access log: rsv');

###############################################################################
