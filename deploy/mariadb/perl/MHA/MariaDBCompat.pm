package MHA::MariaDBCompat;

# Two places where MHA 0.58 (Debian 12's mha4mysql-manager and -node) cannot work with
# MariaDB 10.11 on Perl 5.36. Loaded before MHA through PERL5OPT=-MMHA::MariaDBCompat,
# this redefines just those functions and leaves the rest of the packaged MHA as it is.
#
# 1. A server version is read with sprintf('%03d%03d%03d', <every number in the
#    string>), which Perl 5.22 and later make a fatal "Redundant argument in sprintf"
#    for a version string with more numbers than that (every MariaDB's:
#    "10.11.19-MariaDB-0+deb12u1-log"; upstream yoshinorim/mha4mysql-manager#116,
#    mha4mysql-node#35). Here only the leading major.minor.patch is read.
# 2. Before applying relay logs on a replica, MHA asks for MySQL's
#    @@global.super_read_only, which MariaDB does not have (its read_only already holds
#    back every user without READ ONLY ADMIN, and MHA's own account has that): a
#    server without the variable is treated as one with it off.

use strict;
use warnings;
use Carp qw(croak);
use MHA::NodeUtil ();
use MHA::SlaveUtil ();

my $original_super_read_only_check = \&MHA::SlaveUtil::check_if_super_read_only;

sub leading_numbers {
  my ( $str, $count ) = @_;
  my @numbers = ( $str =~ /^\D*(\d+)(?:\.(\d+))?(?:\.(\d+))?/ );
  return map { $_ // 0 } @numbers[ 0 .. $count - 1 ];
}

{
  no warnings 'redefine';
  *MHA::NodeUtil::parse_mysql_version = sub($) {
    return sprintf( '%03d%03d%03d', leading_numbers( $_[0], 3 ) );
  };
  *MHA::NodeUtil::parse_mysql_major_version = sub($) {
    return sprintf( '%03d%03d', leading_numbers( $_[0], 2 ) );
  };
  *MHA::SlaveUtil::check_if_super_read_only = sub {
    my @result = eval { $original_super_read_only_check->(@_) };
    if ($@) {
      return ( 0, 0 ) if ( $@ =~ /Unknown system variable 'super_read_only'/ );
      croak $@;
    }
    return @result;
  };
}

1;
