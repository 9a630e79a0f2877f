import { Alert, Spinner, Text } from "@chakra-ui/react";

import { HttpError } from "../api";

export const Loading = ({ testId }: { testId?: string }) => (
  <Text color="fg.muted" data-testid={testId ?? "loading"} py={2}>
    <Spinner mr={2} size="sm" />
    Loading…
  </Text>
);

/** What went wrong, plainly: Airflow's refusal (403), a missing object (404) or the server's detail. */
export const describeError = (error: Error): string => {
  if (error instanceof HttpError) {
    if (error.status === 401) {
      return "Not logged in (401): log in to Airflow again.";
    }
    if (error.status === 403) {
      return `Airflow refused (403 Forbidden)${error.detail && error.detail !== "Forbidden" ? `: ${error.detail}` : ""}.`;
    }
    if (error.status === 404) {
      return `Not found (404): ${error.detail}`;
    }
    return `The server answered ${error.status}: ${error.detail}`;
  }
  return `Request failed: ${error.message}`;
};

export const ErrorBox = ({ error, testId }: { error: Error; testId?: string }) => (
  <Alert.Root data-status={error instanceof HttpError ? error.status : ""} data-testid={testId ?? "error"} my={2} status="error">
    <Alert.Indicator />
    <Alert.Title>{describeError(error)}</Alert.Title>
  </Alert.Root>
);

export const Empty = ({ children, testId }: { children: string; testId?: string }) => (
  <Text color="fg.muted" data-testid={testId} py={2}>
    {children}
  </Text>
);
