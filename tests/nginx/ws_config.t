#!/usr/bin/perl

# Tests for nginx-ws: "nginx -t" fails, with nginx's own wording, for bad directive values,
# and accepts a configuration using every tunnel directive.

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

plan(skip_all => 'nginx-ws module not loaded (TEST_NGINX_GLOBALS)') unless module_loaded();

my $conf = <<'EOF';

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        location / {
            proxy_pass    http://127.0.0.1:8081;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "Upgrade";

            %%WS%%
        }
    }
}

EOF

my $good = <<'EOF';
ws_log %%TESTDIR%%/ws.log buffer=32k flush=1s;
            ws_log_events open frame message close reject;
            ws_log_payload 64k;
            ws_idle_timeout 5m;
            ws_max_lifetime 1h;
            ws_ping_interval 30s;
            ws_pong_timeout 10s;
            ws_close_timeout 5s;
            ws_drain 30s;
            ws_max_frame_size 1m;
            ws_max_message_size 16m;
            ws_protocol_check on;
            ws_max_inflated_size 1m;
            ws_limit_log_level warn;
EOF

my @bad = (
	[ 'ws_idle_timeout foo;',
		qr/invalid value "foo" in "ws_idle_timeout" directive/ ],
	[ 'ws_max_frame_size 1q;',
		qr/invalid value "1q" in "ws_max_frame_size" directive/ ],
	[ 'ws_max_message_size big;',
		qr/invalid value "big" in "ws_max_message_size" directive/ ],
	[ 'ws_log_events open foo;',
		qr/invalid value "foo" in "ws_log_events" directive/ ],
	[ 'ws_protocol_check maybe;',
		qr/invalid value "maybe" in "ws_protocol_check" directive/ ],
	[ 'ws_log_payload 100k;',
		qr/"ws_log_payload" must not exceed 65536 bytes/ ],
	[ 'ws_drain 1x;',
		qr/invalid value "1x" in "ws_drain" directive/ ],
	[ 'ws_idle_timeout 1s 2s;',
		qr/invalid number of arguments in "ws_idle_timeout" directive/ ],
	[ 'ws_log %%TESTDIR%%/ws.log flush=1s;',
		qr/"ws_log" ".*\/ws\.log": flush= needs buffer=/ ],
	[ 'ws_max_inflated_size lots;',
		qr/invalid value "lots" in "ws_max_inflated_size" directive/ ],
	[ 'ws_limit_log_level loud;',
		qr/invalid value "loud" in "ws_limit_log_level" directive/ ],
	[ 'ws_route /chat nosuch;',
		qr/ws_route: no upstream "nosuch" defined/ ],
);

my $t = NginxWs::Harness->new()->has(qw/http proxy/);

(my $c = $conf) =~ s/%%WS%%/$good/;
$t->write_file_expand('nginx.conf', $c);
$t->plan(2 * @bad + 2);

my $dir = $t->testdir();

sub nginx_t {
	my ($name) = @_;
	my $out = `$NginxWs::Harness::NGINX -t -p $dir/ -c $name -e $dir/error-t.log 2>&1`;
	my $rc = $? >> 8;

	# "nginx -t" leaves an empty pid file behind (it checks that it can create it), and
	# $t->run() takes an existing pid file for a started nginx
	unlink "$dir/nginx.pid";

	return ($rc, $out);
}

my ($rc, $out) = nginx_t('nginx.conf');
is($rc, 0, 'every directive: nginx -t succeeds') or diag($out);

for my $i (0 .. $#bad) {
	my ($directive, $re) = @{$bad[$i]};
	(my $c = $conf) =~ s/%%WS%%/$directive/;
	$t->write_file_expand("bad$i.conf", $c);
	($rc, $out) = nginx_t("bad$i.conf");
	isnt($rc, 0, "nginx -t fails: $directive");
	like($out, qr/\[emerg\] .*$re.* in \Q$dir\E\/bad$i\.conf:\d+/, "error message: $directive");
}

# and the good configuration runs

$t->run();
like(http_get('/nonexistent-upstream'), qr/^HTTP\/1\.1 502/, 'runs');

###############################################################################
