package NginxWs;

# WebSocket helpers for the nginx-ws tests in nginx-tests format: a raw frame codec (so that
# tests can send exactly the frames they mean, oversized or malformed ones included), a
# client that does the handshake with Protocol::WebSocket like nginx-tests' proxy_websocket.t,
# an echo backend that records every frame it receives, and readers for the module's JSON log.

use warnings;
use strict;

use Exporter qw/ import /;
use IO::Select;
use IO::Socket::INET;
use JSON::PP;
use Test::More qw//;
use Time::HiRes qw/ time sleep /;

use NginxWs::Harness qw/ port log_in log_out /;

our @EXPORT = qw/ module_loaded skip_unless_ready ws_frame ws_connect ws_request ws_send ws_read_frame
	ws_close_payload ws_wait_closed ws_echo_daemon ws_records ws_wait_records backend_frames /;

# True if TEST_NGINX_GLOBALS loads the nginx-ws module.
sub module_loaded {
	return ($ENV{TEST_NGINX_GLOBALS} || '')
		=~ /load_module\s+[^;]*(?:libnginx_ws|ngx_http_ws_module)[^;]*\.so\s*;/;
}

# Skips the whole test unless it can run: Protocol::WebSocket installed and the module loaded.
sub skip_unless_ready {
	eval {
		require Protocol::WebSocket::Handshake::Client;
		require Protocol::WebSocket::Handshake::Server;
	};
	Test::More::plan(skip_all => 'Protocol::WebSocket not installed') if $@;
	Test::More::plan(skip_all => 'nginx-ws module not loaded (TEST_NGINX_GLOBALS)')
		unless module_loaded();
}

# Encodes one frame. Options: fin (default 1), mask (default 1: client frames are masked),
# rsv (the three RSV bits as a number 0..7).
sub ws_frame {
	my ($opcode, $payload, %o) = @_;
	$payload = '' unless defined $payload;
	my $fin = exists $o{fin} ? $o{fin} : 1;
	my $mask = exists $o{mask} ? $o{mask} : 1;
	my $len = length $payload;

	my $b = pack('C', ($fin ? 0x80 : 0) | (($o{rsv} || 0) << 4) | $opcode);
	my $m = $mask ? 0x80 : 0;

	if ($len < 126) {
		$b .= pack('C', $m | $len);
	} elsif ($len < 65536) {
		$b .= pack('Cn', $m | 126, $len);
	} else {
		$b .= pack('CNN', $m | 127, 0, $len);
	}

	if ($mask) {
		my $key = pack('N', int(rand(2**32)));
		$b .= $key;
		$payload ^= substr($key x (int($len / 4) + 1), 0, $len);
	}

	return $b . $payload;
}

# Close frame payload: code and reason.
sub ws_close_payload {
	my ($code, $reason) = @_;
	return pack('n', $code) . (defined $reason ? $reason : '');
}

# Takes one complete frame off the front of $$buf: a hash with fin, rsv, opcode, masked,
# payload (unmasked), and for Close frames code and reason; undef if $$buf holds no whole frame.
sub parse_frame {
	my ($buf) = @_;
	return undef if length $$buf < 2;

	my ($b0, $b1) = unpack('CC', $$buf);
	my $len = $b1 & 0x7f;
	my $off = 2;

	if ($len == 126) {
		return undef if length $$buf < 4;
		$len = unpack('n', substr($$buf, 2, 2));
		$off = 4;
	} elsif ($len == 127) {
		return undef if length $$buf < 10;
		my ($hi, $lo) = unpack('NN', substr($$buf, 2, 8));
		$len = $hi * 2**32 + $lo;
		$off = 10;
	}

	my $masked = $b1 & 0x80;
	my $key;
	if ($masked) {
		return undef if length $$buf < $off + 4;
		$key = substr($$buf, $off, 4);
		$off += 4;
	}

	return undef if length $$buf < $off + $len;

	my $payload = substr($$buf, $off, $len);
	substr($$buf, 0, $off + $len, '');
	$payload ^= substr($key x (int($len / 4) + 1), 0, $len) if $masked;

	my $f = {
		fin => ($b0 & 0x80) ? 1 : 0,
		rsv => ($b0 >> 4) & 7,
		opcode => $b0 & 0x0f,
		masked => $masked ? 1 : 0,
		payload => $payload,
	};

	if ($f->{opcode} == 8 && $len >= 2) {
		$f->{code} = unpack('n', $payload);
		$f->{reason} = substr($payload, 2);
	}

	return $f;
}

# Reads a response head (within 3 seconds): the head and what came after it, or (what came,
# undef) when no whole head did.
sub read_head {
	my ($s) = @_;
	my $got = '';
	$s->blocking(0);
	while (IO::Select->new($s)->can_read(3)) {
		my $n = $s->sysread(my $buf, 65536);
		last unless $n;
		log_in($buf);
		$got .= $buf;
		last if $got =~ /\x0d?\x0a\x0d?\x0a/;
	}
	my ($head, $rest) = split /\x0d?\x0a\x0d?\x0a/, $got, 2;
	return defined $rest ? ($head, $rest) : ($got, undef);
}

# Connects to nginx at 127.0.0.1:port($port), sends the upgrade request for $uri (and
# $pipelined bytes right behind it, in the same write) and reads the 101. Returns the socket,
# or undef if the response was not a completed handshake.
sub ws_connect {
	my ($port, $uri, $pipelined) = @_;

	require Protocol::WebSocket::Handshake::Client;

	my $s = IO::Socket::INET->new(
		Proto => 'tcp',
		PeerAddr => '127.0.0.1:' . port($port),
	)
		or die "Can't connect to nginx: $!\n";

	my $h = Protocol::WebSocket::Handshake::Client->new(
		url => 'ws://localhost' . ($uri || '/'));

	my $buf = $h->to_string;
	$buf .= $pipelined if defined $pipelined;

	local $SIG{PIPE} = 'IGNORE';
	log_out($buf);
	$s->syswrite($buf);

	my ($head, $rest) = read_head($s);
	return undef unless defined $head && $head =~ m!^HTTP/1\.1 101 !;

	$h->parse("$head\x0d\x0a\x0d\x0a");
	return undef unless $h->is_done;

	${*$s}->{_ws_buf} = defined $rest ? $rest : '';
	return $s;
}

# Sends an upgrade request for $uri to 127.0.0.1:port($port) with a valid key and version,
# the headers in %h added (a value of undef leaves a default header out: Sec-WebSocket-Key,
# Sec-WebSocket-Version, Connection), and reads the response head. Returns the status code,
# the head, and the socket (after a 101: positioned at the first frame, for ws_read_frame).
sub ws_request {
	my ($port, $uri, %h) = @_;

	my %default = (
		'Connection' => 'Upgrade',
		'Sec-WebSocket-Key' => 'dGhlIHNhbXBsZSBub25jZQ==',
		'Sec-WebSocket-Version' => '13',
	);
	%h = (%default, %h);
	my $method = delete $h{METHOD} || 'GET';

	my $req = "$method $uri HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n";
	for my $k (sort keys %h) {
		$req .= "$k: $h{$k}\r\n" if defined $h{$k};
	}
	$req .= "\r\n";

	my $s = IO::Socket::INET->new(
		Proto => 'tcp',
		PeerAddr => '127.0.0.1:' . port($port),
	)
		or die "Can't connect to nginx: $!\n";

	local $SIG{PIPE} = 'IGNORE';
	log_out($req);
	$s->syswrite($req);

	my ($head, $rest) = read_head($s);
	return (0, $head, $s) unless defined $head && $head =~ m!^HTTP/1\.1 (\d{3}) !;
	my $status = $1;
	${*$s}->{_ws_buf} = defined $rest ? $rest : '';
	return ($status, $head, $s);
}

sub ws_send {
	my ($s, $bytes) = @_;

	local $SIG{PIPE} = 'IGNORE';
	$s->blocking(1);
	log_out($bytes);
	my $n = $s->syswrite($bytes);
	$s->blocking(0);
	return $n;
}

# Reads the next frame within $timeout seconds (default 3): a hash as parse_frame gives, or
# undef on timeout or end of stream.
sub ws_read_frame {
	my ($s, $timeout) = @_;
	$timeout = 3 unless defined $timeout;

	my $buf = \${*$s}->{_ws_buf};
	$$buf = '' unless defined $$buf;
	my $deadline = time() + $timeout;

	while (1) {
		my $f = parse_frame($buf);
		return $f if $f;

		my $left = $deadline - time();
		return undef if $left <= 0;
		return undef unless IO::Select->new($s)->can_read($left);

		$s->blocking(0);
		my $n = $s->sysread(my $chunk, 65536);
		return undef unless $n;
		log_in($chunk);
		$$buf .= $chunk;
	}
}

# Waits up to $timeout seconds for the peer to close the connection; true if it did.
sub ws_wait_closed {
	my ($s, $timeout) = @_;
	my $deadline = time() + ($timeout || 3);

	while ((my $left = $deadline - time()) > 0) {
		return 0 unless IO::Select->new($s)->can_read($left);
		my $n = $s->sysread(my $chunk, 65536);
		return 1 unless $n;
	}

	return 0;
}

# The backend: accepts connections on 127.0.0.1:port($port) one at a time, completes the
# handshake, echoes text and binary frames as they come (fragments stay fragments), answers
# Ping with Pong and Close with the same Close, and appends one line per received frame to
# $record: "opcode len masked fin" plus " code" for Close frames. The text message "big:N"
# is answered with a text frame of N bytes instead of an echo.
sub ws_echo_daemon {
	my ($port, $record) = @_;

	require Protocol::WebSocket::Handshake::Server;

	my $server = IO::Socket::INET->new(
		Proto => 'tcp',
		LocalAddr => '127.0.0.1:' . port($port),
		Listen => 5,
		Reuse => 1,
	)
		or die "Can't create listening socket: $!\n";

	local $SIG{PIPE} = 'IGNORE';

	while (my $client = $server->accept()) {
		$client->autoflush(1);

		my $hs = Protocol::WebSocket::Handshake::Server->new;
		my $buf = '';

		while (IO::Select->new($client)->can_read(30)) {
			my $n = $client->sysread(my $chunk, 65536);
			last unless $n;
			$buf .= $chunk;

			if (!$hs->is_done) {
				# parse() takes the request off the front of $buf; what stays
				# are frames pipelined behind it.
				last unless defined $hs->parse($buf);
				next unless $hs->is_done;
				$client->syswrite($hs->to_string);
			}

			my $closed;
			while (my $f = parse_frame(\$buf)) {
				open my $fh, '>>', $record or die "Can't open $record: $!";
				printf $fh "%d %d %d %d%s\n", $f->{opcode}, length $f->{payload},
					$f->{masked}, $f->{fin},
					defined $f->{code} ? " $f->{code}" : '';
				close $fh;

				my $op = $f->{opcode};
				if ($op == 8) {
					$client->syswrite(ws_frame(8, $f->{payload}, mask => 0));
					$closed = 1;
					last;
				} elsif ($op == 9) {
					$client->syswrite(ws_frame(10, $f->{payload}, mask => 0));
				} elsif ($op == 1 && $f->{payload} =~ /^big:(\d+)$/) {
					$client->syswrite(ws_frame(1, 'x' x $1, mask => 0));
				} elsif ($op == 0 || $op == 1 || $op == 2) {
					$client->syswrite(ws_frame($op, $f->{payload},
						mask => 0, fin => $f->{fin}));
				}
			}
			last if $closed;
		}

		close $client;
	}
}

# The frames the backend recorded: a list of hashes (opcode, len, masked, fin, code).
sub backend_frames {
	my ($record) = @_;
	open my $fh, '<', $record or return ();
	my @frames;
	while (<$fh>) {
		my ($op, $len, $masked, $fin, $code) = split;
		push @frames, { opcode => $op, len => $len, masked => $masked, fin => $fin,
			code => $code };
	}
	return @frames;
}

# The JSON records in the ws_log file $path.
sub ws_records {
	my ($path) = @_;
	open my $fh, '<', $path or return ();
	my @r;
	while (<$fh>) {
		my $rec = eval { decode_json($_) };
		push @r, $rec // { event => 'NOT-JSON', line => $_ };
	}
	return @r;
}

# Waits up to $timeout seconds (default 5) until the ws_log file $path has a record for which
# $match returns true; returns all records.
sub ws_wait_records {
	my ($path, $match, $timeout) = @_;
	my $deadline = time() + ($timeout || 5);
	my @r;

	while (1) {
		@r = ws_records($path);
		return @r if grep { $match->($_) } @r;
		return @r if time() > $deadline;
		sleep 0.1;
	}
}

1;
