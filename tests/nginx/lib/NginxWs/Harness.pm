package NginxWs::Harness;

# The harness of our nginx-tests-format tests (tests/nginx/*.t): starts the nginx under test in
# a directory of its own with a configuration written by the test, runs backend daemons, and
# checks the error log when the test ends.
#
# It offers the part of nginx-tests' Test::Nginx interface that our tests use, with the same
# names, arguments and environment (TEST_NGINX_BINARY, TEST_NGINX_GLOBALS,
# TEST_NGINX_GLOBALS_HTTP, TEST_NGINX_LEAVE, TEST_NGINX_CATLOG, TEST_NGINX_VERBOSE), so that a
# test written against it runs under nginx-tests after replacing the package name. It is our
# own code, written from that interface, and named differently on purpose: nginx-tests' harness
# lives only in its GitHub repository (and CPAN's Test::Nginx is yet another module, OpenResty's),
# and a file called Test/Nginx.pm under tests/nginx/lib would shadow nginx's harness whenever
# both are on @INC.

use warnings;
use strict;

use Exporter qw/ import /;
use File::Path qw/ rmtree /;
use File::Temp qw/ tempdir /;
use IO::Socket::INET;
use POSIX qw/ WNOHANG /;
use Scalar::Util qw/ weaken /;
use Test::More qw//;
use Time::HiRes qw/ sleep time /;

our @EXPORT = qw/ port http http_get log_in log_out /;

our $NGINX = $ENV{TEST_NGINX_BINARY};

# The harnesses still alive, checked at the end of the test (weak references).
my @live;

sub new {
	my ($class) = @_;

	Test::More::BAIL_OUT('TEST_NGINX_BINARY is not set: the nginx binary to test')
		unless defined $NGINX;
	Test::More::BAIL_OUT("TEST_NGINX_BINARY: no executable $NGINX")
		unless -x $NGINX;

	my $dir = tempdir('nginx-ws-test-XXXXXXXX', TMPDIR => 1)
		or die "cannot create a test directory: $!\n";
	# nginx's workers run as nobody when the tests run as root
	chmod 0755, $dir;

	my $self = bless { dir => $dir, pid => $$, daemons => [] }, $class;
	push @live, $self;
	weaken($live[-1]);
	return $self;
}

sub testdir { $_[0]{dir} }

###############################################################################
# What the binary has: `nginx -V`, and has() skipping the whole test when a feature is missing.

my $configure;

sub configure_args {
	$configure = `$NGINX -V 2>&1` unless defined $configure;
	return $configure;
}

# Each feature our tests ask for, as a test on the configure arguments.
my %features = (
	http => sub { $_[0] !~ /--without-http(?!_)/ },
	proxy => sub { $_[0] !~ /--without-http_proxy_module/ },
	map => sub { $_[0] !~ /--without-http_map_module/ },
	split_clients => sub { $_[0] !~ /--without-http_split_clients_module/ },
	upstream_hash => sub { $_[0] !~ /--without-http_upstream_hash_module/ },
	rewrite => sub { $_[0] !~ /--without-http_rewrite_module/ },
	ssl => sub { $_[0] =~ /--with-http_ssl_module/ },
);

sub has_module {
	my ($self, $feature) = @_;
	my $test = $features{$feature}
		or die "has(): unknown feature \"$feature\" (add it to NginxWs::Harness)\n";
	return $test->(configure_args());
}

sub has {
	my ($self, @wanted) = @_;
	for my $feature (@wanted) {
		Test::More::plan(skip_all => "no $feature available")
			unless $self->has_module($feature);
	}
	return $self;
}

# The test's own assertions, plus the two checks of the error log made at the end.
sub plan {
	my ($self, $n) = @_;
	Test::More::plan(tests => $n + 2);
	return $self;
}

###############################################################################
# Files in the test directory.

sub read_file {
	my ($self, $name) = @_;
	open my $fh, '<', "$self->{dir}/$name" or die "cannot read $name: $!\n";
	local $/;
	my $text = <$fh>;
	return defined $text ? $text : '';
}

sub write_file {
	my ($self, $name, $content) = @_;
	open my $fh, '>', "$self->{dir}/$name" or die "cannot write $name: $!\n";
	binmode $fh;
	print $fh $content;
	close $fh or die "cannot write $name: $!\n";
	return $self;
}

sub test_globals {
	my ($self) = @_;
	return "pid $self->{dir}/nginx.pid;\n"
		. "error_log $self->{dir}/error.log debug;\n"
		. ($ENV{TEST_NGINX_GLOBALS} || '');
}

sub test_globals_http {
	my ($self) = @_;
	my $d = $self->{dir};
	my $s = "root $d;\naccess_log $d/access.log;\nclient_body_temp_path $d/client_body_temp;\n";
	$s .= "proxy_temp_path $d/proxy_temp;\n" if $self->has_module('proxy');
	for my $m (qw/ fastcgi uwsgi scgi /) {
		$s .= "${m}_temp_path $d/${m}_temp;\n"
			unless configure_args() =~ /--without-http_${m}_module/;
	}
	return $s . ($ENV{TEST_NGINX_GLOBALS_HTTP} || '');
}

# Writes a configuration: %%TEST_GLOBALS%%, %%TEST_GLOBALS_HTTP%% and %%TESTDIR%% filled in,
# and every "127.0.0.1:8NNN" and %%PORT_8NNN%% given the port that port(8NNN) stands for.
sub write_file_expand {
	my ($self, $name, $content) = @_;

	$self->{own_globals} = 1 if $content =~ /%%TEST_GLOBALS%%/;
	$content =~ s/%%TEST_GLOBALS%%/$self->test_globals()/ge;
	$content =~ s/%%TEST_GLOBALS_HTTP%%/$self->test_globals_http()/ge;
	$content =~ s/%%TESTDIR%%/$self->{dir}/g;
	$content =~ s/127\.0\.0\.1:(8\d\d\d)\b/'127.0.0.1:' . port($1)/ge;
	$content =~ s/%%PORT_(\d+)%%/port($1)/ge;

	return $self->write_file($name, $content);
}

###############################################################################
# nginx and the daemons.

# The arguments every nginx command line of this test gets.
sub nginx_args {
	my ($self) = @_;
	my $d = $self->{dir};
	my @args = ('-p', "$d/", '-c', 'nginx.conf', '-e', 'error.log');
	push @args, '-g', "pid $d/nginx.pid; error_log $d/error.log debug;"
		unless $self->{own_globals};
	return @args;
}

# Starts nginx (in the foreground of a child: the configuration says "daemon off") and waits
# until it has written its pid file.
sub run {
	my ($self) = @_;

	my $pid = fork();
	die "fork: $!\n" unless defined $pid;
	if ($pid == 0) {
		exec($NGINX, $self->nginx_args()) or POSIX::_exit(127);
	}

	$self->{nginx} = $pid;
	my $pidfile = "$self->{dir}/nginx.pid";
	my $deadline = time() + 10;
	until (-s $pidfile) {
		if (waitpid($pid, WNOHANG) == $pid || time() > $deadline) {
			delete $self->{nginx};
			die "nginx did not start; its error log:\n"
				. (eval { $self->read_file('error.log') } || '');
		}
		sleep 0.05;
	}
	return $self;
}

sub master_pid {
	my ($self) = @_;
	my $pid = eval { $self->read_file('nginx.pid') };
	return defined $pid && $pid =~ /(\d+)/ ? $1 : $self->{nginx};
}

sub reload {
	my ($self) = @_;
	kill 'HUP', $self->master_pid() if $self->{nginx};
	return $self;
}

# Waits up to $secs seconds for the child $pid to exit, then sends it $signal and waits.
sub reap {
	my ($pid, $secs, $signal) = @_;
	my $deadline = time() + $secs;
	while (waitpid($pid, WNOHANG) == 0) {
		if (time() > $deadline) {
			kill $signal, $pid;
			waitpid($pid, 0);
			return;
		}
		sleep 0.05;
	}
}

# Graceful stop (QUIT), as nginx -s quit; TERM after 90 seconds.
sub stop {
	my ($self) = @_;
	my $pid = delete $self->{nginx} or return $self;

	kill 'QUIT', $self->master_pid();
	reap($pid, 90, 'TERM');
	return $self;
}

# Runs a daemon in a child process: a code reference called with @args, or a program.
sub run_daemon {
	my ($self, $code, @args) = @_;

	my $pid = fork();
	die "fork: $!\n" unless defined $pid;
	if ($pid == 0) {
		if (ref $code eq 'CODE') {
			$code->(@args);
			POSIX::_exit(0);
		}
		exec($code, @args) or POSIX::_exit(127);
	}

	push @{$self->{daemons}}, $pid;
	return $self;
}

sub stop_daemons {
	my ($self) = @_;
	while (my $pid = shift @{$self->{daemons}}) {
		kill 'TERM', $pid;
		reap($pid, 5, 'KILL');
	}
	return $self;
}

sub waitforsocket {
	my ($self, $peer) = @_;
	my $deadline = time() + 5;
	while (time() < $deadline) {
		return 1 if IO::Socket::INET->new(Proto => 'tcp', PeerAddr => $peer);
		sleep 0.1;
	}
	return undef;
}

sub waitforfile {
	my ($self, $file) = @_;
	my $deadline = time() + 5;
	while (time() < $deadline) {
		return 1 if -e $file;
		sleep 0.1;
	}
	return undef;
}

# The end of the test: nginx and the daemons stopped, then (when the test has a plan) two
# assertions on nginx's error log: no [alert] lines, and no crash (a worker that exited on a
# signal, or a sanitizer report).
sub finish {
	my ($self) = @_;
	return if $self->{finished} || $self->{pid} != $$;
	$self->{finished} = 1;

	$self->stop();
	$self->stop_daemons();

	if (Test::More->builder->expected_tests) {
		my $log = eval { $self->read_file('error.log') } || '';
		Test::More::is(join("\n", $log =~ /^.*\[alert\].*$/mg), '', 'no alerts');
		Test::More::is(join("\n", $log =~ /^.*(?:exited on signal|Sanitizer).*$/mg), '',
			'no crashes');
	}

	system('cat', "$self->{dir}/error.log") if $ENV{TEST_NGINX_CATLOG};
	rmtree($self->{dir}) unless $ENV{TEST_NGINX_LEAVE};
}

sub DESTROY { $_[0]->finish() }

# Before Test::More's own end-of-test check (END blocks run last defined first).
END {
	local $?;
	$_ && $_->finish() for @live;
}

###############################################################################
# Ports: the numbers in a test (8080, 8081, ...) stand for free ports picked at run time.

my %ports;

sub port {
	my ($num) = @_;
	return $ports{$num} if $ports{$num};

	my %taken = reverse %ports;
	for (1 .. 20) {
		my $s = IO::Socket::INET->new(Proto => 'tcp', LocalAddr => '127.0.0.1:0', Listen => 1)
			or die "cannot find a free port: $!\n";
		my $p = $s->sockport();
		next if $taken{$p};
		return $ports{$num} = $p;
	}
	die "cannot find a free port\n";
}

###############################################################################
# Clients.

sub log_line {
	my ($dir, $msg) = @_;
	return unless $ENV{TEST_NGINX_VERBOSE};
	$msg = substr($msg, 0, 2048) . '(...)' if length $msg > 2048;
	$msg =~ s/([^\x20-\x7e\n])/sprintf('\\x%02x', ord $1)/ge;
	$msg =~ s/^/# $dir /mg;
	print $msg, ($msg =~ /\n\z/ ? '' : "\n");
}

sub log_out { log_line('>>', @_) }
sub log_in { log_line('<<', @_) }

# Sends a whole HTTP request to port(8080) and returns the whole response (read until the
# server closes), or undef after 8 seconds or on a connection error. Options: body (sent after
# the request), socket (an open connection to use).
sub http {
	my ($request, %o) = @_;
	my $reply;

	eval {
		local $SIG{ALRM} = sub { die "timeout\n" };
		local $SIG{PIPE} = sub { die "sigpipe\n" };
		alarm(8);

		my $s = $o{socket} || IO::Socket::INET->new(
			Proto => 'tcp',
			PeerAddr => '127.0.0.1:' . port(8080),
		) or die "cannot connect to nginx: $!\n";

		$request .= $o{body} if defined $o{body};
		log_out($request);
		$s->print($request);

		local $/;
		$reply = $s->getline();
		$s->close();
		alarm(0);
	};
	alarm(0);
	if ($@) {
		log_in("died: $@");
		return undef;
	}

	log_in($reply) if defined $reply;
	return $reply;
}

sub http_get {
	my ($uri, %o) = @_;
	return http("GET $uri HTTP/1.0\r\nHost: localhost\r\n\r\n", %o);
}

1;
